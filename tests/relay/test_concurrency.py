"""Several relay processes at once over thousands of events: each published once, per-order order kept."""

import json
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager

import pytest
from django.db import connection, connections

from outbox.models import OutboxEvent
from tests.kafka_tools import read_topic, wait_for
from tests.processes import suite_env

ORDERS, EVENTS_PER_ORDER, RELAYS = 400, 5, 3


@contextmanager
def _table_locked():
    with connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLES {OutboxEvent._meta.db_table} WRITE")
        try:
            yield
        finally:
            cursor.execute("UNLOCK TABLES")


def _sessions_waiting_for_the_table() -> int:
    with connections["default"].cursor() as cursor:  # (the lock holder's own session is not waiting)
        cursor.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE state LIKE %s AND db = DATABASE()",
                       ["Waiting for table%lock"])
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_concurrent_relays_publish_every_event_exactly_once_in_per_order_order(broker):
    prefix = f"test-{uuid.uuid4().hex[:8]}."
    topic = prefix + "order"
    broker.create_topics(topic)
    # Interleaved like real traffic: event n of every order, then event n+1 of every order...
    OutboxEvent.objects.bulk_create(
        OutboxEvent(aggregate_type="order", aggregate_id=str(order), event_type=f"Step{step}",
                    payload={"order": order, "step": step})
        for step in range(EVENTS_PER_ORDER) for order in range(ORDERS)
    )
    env = suite_env(broker, OUTBOX_TOPIC_PREFIX=prefix,
                    OUTBOX_BATCH_SIZE="100")  # many small batches: many chances to collide
    # The table is write-locked until every relay waits on its first claim: they start at the same moment,
    # whatever their start-up takes (one started early could otherwise drain everything alone).
    with _table_locked():
        relays = [subprocess.Popen([sys.executable, "manage.py", "relay_outbox", "--until-empty"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for _ in range(RELAYS)]
        wait_for(lambda: _sessions_waiting_for_the_table() >= RELAYS, timeout=120, interval=0.1,
                 message="every relay to wait on its first claim")
    outputs = [relay.communicate(timeout=180)[0] for relay in relays]
    assert all(relay.returncode == 0 for relay in relays), outputs
    published_counts = [int(out.split("published ")[1].split()[0]) for out in outputs]
    assert sum(published_counts) == ORDERS * EVENTS_PER_ORDER
    assert sum(1 for n in published_counts if n > 0) >= 2, published_counts  # they really ran side by side

    total = ORDERS * EVENTS_PER_ORDER
    records = read_topic(broker.bootstrap, topic, until=lambda rs: len(rs) >= total, timeout=60)
    by_id = Counter(r.headers["id"] for r in records)
    assert len(by_id) == total and set(by_id.values()) == {1}
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {"sent"}

    steps = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        steps[record.key].append(json.loads(record.value)["step"])
    assert all(seq == list(range(EVENTS_PER_ORDER)) for seq in steps.values())


@pytest.mark.django_db(transaction=True)
def test_relays_as_deployed_two_workers_and_beat_publish_every_event_once_in_per_order_order(broker, tmp_path):
    """Two `celery -A project worker` processes (two prefork children each) and `celery -A project beat`, while
    bursts of commits wake them: every event published once, each order's events in order, as deployed."""
    import redis
    from django.conf import settings
    from django.db import transaction

    from outbox.hooks import schedule_after_commit
    from tests.kafka_tools import wait_for

    prefix = f"test-{uuid.uuid4().hex[:8]}."
    topic = prefix + "order"
    broker.create_topics(topic)
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    env = suite_env(broker, OUTBOX_TOPIC_PREFIX=prefix, OUTBOX_BATCH_SIZE="100", OUTBOX_POLL_INTERVAL="0.5")
    logs = open(tmp_path / "relays.log", "wb")
    processes = [
        subprocess.Popen([sys.executable, "-m", "celery", "-A", "project", "worker", "--loglevel", "WARNING",
                          "--concurrency", "2", "--without-mingle", "--without-gossip", "-n", f"relay{i}@%h"],
                         env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
        for i in range(2)
    ] + [subprocess.Popen([sys.executable, "-m", "celery", "-A", "project", "beat", "--loglevel", "WARNING",
                           "--schedule", str(tmp_path / "beat-schedule")], env=env, stdout=logs,
                          stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        # Bursts of commits, each waking the relay, with each order's events spread over several of them.
        for step in range(EVENTS_PER_ORDER):
            for first in range(0, ORDERS, 100):
                with transaction.atomic():
                    OutboxEvent.objects.bulk_create(
                        OutboxEvent(aggregate_type="order", aggregate_id=str(order), event_type=f"Step{step}",
                                    payload={"order": order, "step": step})
                        for order in range(first, first + 100)
                    )
                    schedule_after_commit()
        total = ORDERS * EVENTS_PER_ORDER
        wait_for(lambda: not OutboxEvent.objects.exclude(status="sent").exists(), timeout=120, interval=0.5,
                 message="the workers to publish every event")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        logs.close()
    log = (tmp_path / "relays.log").read_text()
    *workers, beat = processes
    assert all(worker.returncode == 0 for worker in workers), log[-3000:]
    # Beat's shelve-backed schedule is closed twice at SIGTERM (Celery's signal handler, then its service's own
    # stop), and now and then the second close meets the closed shelf: beat's exit, not the relay's.
    assert beat.returncode == 0 or "invalid operation on closed shelf" in log, log[-3000:]

    records = read_topic(broker.bootstrap, topic, until=lambda rs: len(rs) >= total, timeout=60)
    by_id = Counter(r.headers["id"] for r in records)
    assert len(by_id) == total and set(by_id.values()) == {1}  # no crash, so no duplicate either
    steps = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        steps[record.key].append(json.loads(record.value)["step"])
    assert all(seq == list(range(EVENTS_PER_ORDER)) for seq in steps.values())
