"""What the cdc image installs is what we test: a venv built from requirements-cdc.txt alone (the Dockerfile's cdc
target) runs relay_cdc with production settings and publishes a row from the binlog; SIGTERM stops it with 0.

The venv lives in .run/ and is rebuilt only when requirements-cdc.txt changes.
"""

import signal
import subprocess
import uuid

import pytest

from tests.cdc_tools import PROJECT, BinlogDatabase, outbox_insert
from tests.kafka_tools import Broker, read_topic
from tests.test_production import _production_env, _run, kafka_settings, venv_from_lock  # noqa: F401 (the fixture: no override)

pytestmark = pytest.mark.cdc

LOCK = PROJECT / "requirements-cdc.txt"


@pytest.fixture(scope="module")
def cdc_venv():
    """A venv with requirements-cdc.txt installed and nothing else."""
    return venv_from_lock(LOCK, "cdc-venv")


def test_relay_cdc_runs_from_the_cdc_lock_alone(cdc_venv):
    python = str(cdc_venv / "bin" / "python")
    _run([python, "-m", "pip", "check"], env=_production_env(cdc_venv))
    db, broker = BinlogDatabase(), Broker(topics=("outbox.event.order",))
    db.install()
    broker.start()
    try:
        key = f"cdc-lock-{uuid.uuid4().hex[:8]}"
        with db.connect() as connection:
            event_id = outbox_insert(connection, order_id=key)
        env = _production_env(cdc_venv, **db.env(), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap)
        relay_cdc = subprocess.Popen([python, "manage.py", "relay_cdc"], cwd=PROJECT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            records = read_topic(broker.bootstrap, "outbox.event.order", keys={key}, timeout=90,
                                 until=lambda records: records)
            assert records[0].headers["id"] == event_id
            relay_cdc.send_signal(signal.SIGTERM)
            assert relay_cdc.wait(60) == 0, relay_cdc.stdout.read()
        finally:
            if relay_cdc.poll() is None:
                relay_cdc.kill()
                relay_cdc.wait(30)
    finally:
        broker.stop()
        db.destroy()
