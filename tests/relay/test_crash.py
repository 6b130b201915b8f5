"""A relay process killed (SIGKILL) after the broker acknowledged its batch and before the database commit that
marks it: the rows stay pending and are published again (a duplicate), never lost."""

import json
import signal
import subprocess
import sys

import pytest

from outbox.models import OutboxEvent
from tests.kafka_tools import read_topic
from tests.processes import suite_env
from tests.relay.helpers import TOPIC, enqueue, relay_until

# The relay_outbox command, with the batch's mark (its last statement before the commit) followed by SIGKILL:
# a kill in exactly that window, not a random one.
KILLED_AFTER_ACK = """
import os, signal, django
django.setup()
from relay import publish
mark = publish._mark_sent

def mark_then_die(acked, **kwargs):
    mark(acked, **kwargs)
    if acked:
        print("acknowledged", len(acked), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

publish._mark_sent = mark_then_die
from django.core.management import call_command
call_command("relay_outbox")
"""


@pytest.mark.django_db(transaction=True)
def test_relay_killed_between_the_ack_and_the_commit_publishes_again_and_loses_nothing(broker):
    events = [enqueue(f"crash-{n}", "OrderCreated") for n in range(5)]
    keys = {event.aggregate_id for event in events}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ACK], env=suite_env(broker), capture_output=True,
                            text=True, timeout=60)

    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "acknowledged 5" in killed.stdout
    # The broker has them; the database does not know: its mark died with the transaction.
    first = read_topic(broker.bootstrap, TOPIC, keys=keys, until=lambda rs: len(rs) >= 5)
    assert {r.headers["id"] for r in first} == {str(e.event_id) for e in events}
    assert OutboxEvent.objects.filter(pk__in=[e.pk for e in events], status="pending").count() == 5

    relay_until(lambda: OutboxEvent.objects.filter(pk__in=[e.pk for e in events], status="sent").count() == 5,
                timeout=30, message="the rows published again and marked")
    records = read_topic(broker.bootstrap, TOPIC, keys=keys, until=lambda rs: len(rs) >= 10)
    ids = [r.headers["id"] for r in records]
    assert sorted(ids) == sorted(str(e.event_id) for e in events for _ in range(2))  # each twice, none lost
    assert all(json.loads(r.value)["order_id"] in keys for r in records)
