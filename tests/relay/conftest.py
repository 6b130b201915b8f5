import pytest

from relay import kafka
from tests.relay.helpers import ScriptedProducer


@pytest.fixture
def producer(monkeypatch):
    """kafka.publish replaced by a ScriptedProducer, for the event messages and the DLQ's alike."""
    scripted = ScriptedProducer()
    monkeypatch.setattr(kafka, "publish", scripted)
    return scripted
