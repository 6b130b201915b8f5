"""consume_events as deployed (subprocesses of `manage.py consume_events`) under kills, signals, rebalances and
a broker that comes back empty, against the real broker and database."""

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from inbox.models import ConsumerDeadLetter, ProcessedEvent
from stats.models import CustomerStats
from tests.kafka_tools import read_topic, wait_for
from tests.processes import suite_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def topic(broker):
    name = f"test-events-{uuid.uuid4().hex[:8]}"
    broker.create_topics(name, partitions=3)
    return name


@pytest.fixture
def group():
    return f"test-{uuid.uuid4().hex[:8]}"


class Stream:
    """Order events produced to a topic, and the projection they must add up to."""

    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self.truth: dict[str, list] = {}
        self.event_ids: list[str] = []
        self.orders = 0

    def send(self, event_type: str, payload: dict, *, event_id: str | None = None) -> str:
        event_id = event_id or str(uuid.uuid4())
        headers = {"id": event_id, "eventType": event_type, "aggregateType": "order",
                   "aggregateId": payload["order_id"], "occurredAt": "2026-01-01T00:00:00+00:00"}
        self.producer.produce(self.topic, key=payload["order_id"], value=json.dumps(payload).encode(),
                              headers=[(k, v.encode()) for k, v in headers.items()])
        self.producer.poll(0)
        self.event_ids.append(event_id)
        return event_id

    def order(self, customer: str, total: str, *, cancel: bool = False, event_type: str = "OrderCreated", **extra):
        self.orders += 1
        payload = {"order_id": f"o-{self.orders}", "customer_id": customer, "total": total, "items": [], **extra}
        created = self.send(event_type, payload)
        truth = self.truth.setdefault(customer, [0, 0, Decimal("0")])
        truth[0] += 1
        truth[2] += Decimal(total)
        if cancel:
            self.send("OrderCancelled", payload)
            truth[1] += 1
            truth[2] -= Decimal(total)
        return created

    def flush(self) -> None:
        assert self.producer.flush(15) == 0

    def projection_matches(self) -> bool:
        projected = {s.customer_id: [s.orders_created, s.orders_cancelled, s.total_spent]
                     for s in CustomerStats.objects.filter(customer_id__in=list(self.truth))}
        return projected == self.truth


def consumer_process(broker, topic, group, *args, log: Path | None = None, **env):
    """With `log`, the output goes (unbuffered) to that file, which a test can read while the process runs."""
    consumer_config = json.dumps({"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    env = suite_env(broker, KAFKA_CONSUMER_CONFIG=consumer_config, INBOX_GROUP_ID=group, INBOX_TOPICS=topic,
                    INBOX_DLQ_TOPIC="order-stats.dlq", INBOX_BACKOFF_BASE="0.05",
                    **({"PYTHONUNBUFFERED": "1"} if log else {}), **env)
    return subprocess.Popen([sys.executable, "manage.py", "consume_events", *args], env=env,
                            stdout=open(log, "w") if log else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def applied(group: str) -> int:
    return ProcessedEvent.objects.filter(group_id=group).count()


def committed_offsets(broker, topic: str, group: str) -> dict[int, int]:
    probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
        return {tp.partition: tp.offset for tp in probe.committed([TopicPartition(topic, p) for p in partitions],
                                                                  timeout=10)}
    finally:
        probe.close()


def finish(process, sig=signal.SIGTERM, timeout=30) -> str:
    if process.poll() is None:
        process.send_signal(sig)
    output, _ = process.communicate(timeout=timeout)
    return output


@pytest.mark.parametrize("partitions_after", [1, 3])
def test_broker_restarted_empty_under_a_running_consumer_the_consumer_heals(broker_outage, group, partitions_after):
    topic = f"test-events-{uuid.uuid4().hex[:8]}"
    broker_outage.create_topics(topic, partitions=1)
    stream = Stream(broker_outage.bootstrap, topic)
    for _ in range(30):
        stream.order("c-restart", "1.00")
    stream.flush()
    process = consumer_process(broker_outage, topic, group)
    try:
        wait_for(lambda: applied(group) == 30, timeout=60, interval=0.2, message="the first events applied")
        broker_outage.stop()
        time.sleep(3)
        broker_outage.start()
        # The topic comes back later (the consumer has seen it missing), as another topic (new id, offsets from 0
        # again), with as many or more partitions: what a relay's first produce after the restart does.
        time.sleep(8)
        broker_outage.create_topics(topic, partitions=partitions_after)
        stream = Stream(broker_outage.bootstrap, topic)
        for _ in range(4):
            stream.order("c-restart-2", "2.00")
        stream.flush()
        wait_for(lambda: applied(group) == 34, timeout=90, interval=0.5, message="events after the restart applied")
    finally:
        output = finish(process)
    assert process.returncode == 0, output


def _hold(stream: Stream, tmp_path, customer: str) -> tuple[object, object]:
    """One TestHold event: its handler stops in the middle of its batch's transaction until released."""
    entered, release = tmp_path / f"entered-{stream.orders}", tmp_path / f"release-{stream.orders}"
    stream.order(customer, "5.00", event_type="TestHold", entered=str(entered), release=str(release))
    return entered, release


def test_sigkill_in_the_middle_of_a_batch_redelivers_it_all_and_applies_it_once(broker, topic, group, tmp_path):
    stream = Stream(broker.bootstrap, topic)
    for _ in range(20):
        stream.order("c-kill", "1.00", cancel=True)
    entered, release = _hold(stream, tmp_path, "c-kill")
    for _ in range(20):
        stream.order("c-kill", "2.00")
    stream.flush()

    first = consumer_process(broker, topic, group)
    wait_for(entered.exists, timeout=60, interval=0.05, message="the batch to reach the held event")
    first.kill()
    first.communicate(timeout=30)
    assert not ProcessedEvent.objects.filter(group_id=group, event_type="TestHold").exists()
    assert applied(group) < len(stream.event_ids)
    committed_before = committed_offsets(broker, topic, group)

    release.touch()
    second = consumer_process(broker, topic, group)
    try:
        wait_for(lambda: applied(group) == len(stream.event_ids), timeout=60, interval=0.2, message="all applied")
    finally:
        output = finish(second)
    assert second.returncode == 0, output
    assert stream.projection_matches()
    # Nothing of the killed batch had been committed to Kafka: offsets only ever follow database commits.
    held = ProcessedEvent.objects.get(group_id=group, event_type="TestHold")
    assert committed_before.get(held.partition, -1001) <= held.offset
    assert sorted(ProcessedEvent.objects.filter(group_id=group).values_list("event_id", flat=True)) == sorted(stream.event_ids)


def test_sigterm_while_a_batch_is_in_flight_finishes_it_commits_and_exits_zero(broker, topic, group, tmp_path):
    stream = Stream(broker.bootstrap, topic)
    for _ in range(10):
        stream.order("c-term", "1.00")
    entered, release = _hold(stream, tmp_path, "c-term")
    for _ in range(10):
        stream.order("c-term", "1.00")
    stream.flush()

    process = consumer_process(broker, topic, group)
    wait_for(entered.exists, timeout=60, interval=0.05, message="the batch to reach the held event")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the signal has arrived while the batch is held (nothing to poll for: a window made explicit)
    release.touch()
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 0, output
    held = ProcessedEvent.objects.get(group_id=group, event_type="TestHold")
    # The held batch was finished and its offsets committed before the exit.
    assert committed_offsets(broker, topic, group)[held.partition] > held.offset
    done = ProcessedEvent.objects.filter(group_id=group)
    for partition, offset in committed_offsets(broker, topic, group).items():
        assert done.filter(partition=partition).count() == max(offset, 0)


def test_sigint_exits_zero_and_leaves_the_group(broker, topic, group):
    stream = Stream(broker.bootstrap, topic)
    stream.order("c-int", "1.00")
    stream.flush()
    process = consumer_process(broker, topic, group)
    wait_for(lambda: applied(group) == 1, timeout=60, interval=0.2, message="applied")
    output = finish(process, signal.SIGINT)
    assert process.returncode == 0, output

    # Left, not just gone: a new member gets every partition at once, without waiting out the session timeout.
    started = time.monotonic()
    successor = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "session.timeout.ms": 30000})
    try:
        successor.subscribe([topic])
        wait_for(lambda: successor.poll(0.1) is None and len(successor.assignment()) == 3, timeout=25,
                 message="the successor to own every partition")
    finally:
        successor.close()
    assert time.monotonic() - started < 25  # well inside the 30 s a member that did not leave would hold them


def test_two_consumer_processes_share_the_partitions_through_rebalances_and_the_projection_is_exact(
        broker, topic, group, tmp_path):
    stream = Stream(broker.bootstrap, topic)
    stop = threading.Event()
    third_log = tmp_path / "third-consumer.log"

    def produce():
        n = 0
        while not stop.is_set() and n < 3000:
            stream.order(f"c-{n % 37}", f"{n % 9 + 1}.25", cancel=n % 4 == 0)
            n += 1
            if n % 50 == 0:
                time.sleep(0.05)
        stream.flush()

    producer = threading.Thread(target=produce)
    producer.start()
    consumers = [consumer_process(broker, topic, group), consumer_process(broker, topic, group)]
    try:
        wait_for(lambda: applied(group) > 300, timeout=60, interval=0.1, message="the stream to be under way")
        consumers.append(consumer_process(broker, topic, group, log=third_log))  # a rebalance: a third joins
        # Up (its "consuming" line comes after its signal handlers are in), so the rebalance happens mid-stream
        # even on a slow machine, where start-up can outlast the rest of the stream.
        wait_for(lambda: "consuming" in third_log.read_text(), timeout=60, interval=0.1,
                 message="the third consumer to start")
        wait_for(lambda: applied(group) > 1500, timeout=60, interval=0.1, message="more applied")
        consumers[0].kill()  # another: one dies in the middle of whatever it was doing
        producer.join(60)
        wait_for(lambda: applied(group) == len(set(stream.event_ids)), timeout=120, interval=0.2,
                 message="every event applied")
    finally:
        stop.set()
        producer.join(60)
        outputs = [finish(c) for c in consumers[1:]]
        consumers[0].communicate(timeout=10)
    assert [c.returncode for c in consumers[1:]] == [0, 0], [*outputs, third_log.read_text()]
    assert stream.projection_matches()
    counts = Counter(ProcessedEvent.objects.filter(group_id=group).values_list("event_id", flat=True))
    assert set(counts.values()) == {1} and set(counts) == set(stream.event_ids)
    assert not ConsumerDeadLetter.objects.filter(group_id=group).exists()


def test_partitions_revoked_while_a_batch_is_held_commit_nothing_past_the_database(broker, topic, group, tmp_path):
    stream = Stream(broker.bootstrap, topic)
    for n in range(30):
        stream.order(f"c-{n % 5}", "1.00")
    entered, release = _hold(stream, tmp_path, "c-0")
    for n in range(30):
        stream.order(f"c-{n % 5}", "3.00", cancel=n % 3 == 0)
    stream.flush()

    first = consumer_process(broker, topic, group)
    wait_for(entered.exists, timeout=60, interval=0.05, message="the batch to reach the held event")
    second = consumer_process(broker, topic, group)  # joins: the group rebalances while the first holds a batch
    try:
        time.sleep(2)  # the join request is in (the rebalance waits for the held member: a window made explicit)
        # Whatever was committed to Kafka meanwhile is covered by what the database has applied.
        done = ProcessedEvent.objects.filter(group_id=group)
        for partition, offset in committed_offsets(broker, topic, group).items():
            assert offset <= done.filter(partition=partition).count() or offset < 0
        release.touch()
        wait_for(lambda: applied(group) == len(stream.event_ids), timeout=60, interval=0.2, message="all applied")
    finally:
        outputs = [finish(first), finish(second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert stream.projection_matches()
    # Every partition's offset right after its last event (each was applied, so the database knows its offset).
    done = ProcessedEvent.objects.filter(group_id=group)
    ends = {p: done.filter(partition=p).order_by("-offset").first().offset + 1 for p in range(3)}
    assert committed_offsets(broker, topic, group) == ends, outputs


@pytest.mark.restarts_servers
def test_the_database_stopped_for_real_while_the_consumer_is_busy_is_waited_out(broker, topic, group):
    from django.db import connection

    from chaos.procs import mariadb_start, mariadb_stop

    stream = Stream(broker.bootstrap, topic)
    for n in range(200):
        stream.order(f"c-{n % 7}", "1.50", cancel=n % 5 == 0)
    stream.flush()
    stop_at = len(stream.event_ids) // 5
    # Small batches, so that the consumer is in the middle of the backlog when the database goes.
    process = consumer_process(broker, topic, group, INBOX_BATCH_SIZE="5")
    try:
        wait_for(lambda: applied(group) >= stop_at, timeout=60, interval=0.02, message="the consumer under way")
        connection.close()
        mariadb_stop()
        for n in range(20):  # events keep coming while the database is down
            stream.order("c-outage", "2.00")
        stream.flush()
        time.sleep(3)
        mariadb_start()
        connection.close()
        wait_for(lambda: applied(group) == len(stream.event_ids), timeout=120, interval=0.5, message="all applied")
    finally:
        output = finish(process)
    assert process.returncode == 0, output
    assert "database unavailable" in output
    assert stream.projection_matches()
    assert not ConsumerDeadLetter.objects.filter(group_id=group).exists()


def test_two_consumers_with_hostile_messages_between_good_ones_apply_every_good_one_and_never_exit(broker, group):
    """A group of two consume_events; hostile messages (from test_consumer.HOSTILE_VALUES: nesting 5,000 deep,
    5,000-digit numbers, invalid UTF-8, empty, 1 MB, an array, wrong field types) between good ones. Every good
    event applied once, every hostile one dead-lettered, both processes alive, every offset committed."""
    from tests.inbox.test_consumer import HOSTILE_VALUES

    topic = f"test-events-{uuid.uuid4().hex[:8]}"
    broker.create_topics(topic, partitions=3)
    stream = Stream(broker.bootstrap, topic)
    stream.producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                                "linger.ms": 5, "message.max.bytes": 2_000_000})
    processes = [consumer_process(broker, topic, group) for _ in range(2)]
    hostile = 0
    try:
        for round_ in range(3):
            for name, value in HOSTILE_VALUES.items():
                stream.order(f"c-hostile-{round_ % 2}", "2.50")
                order_id = f"hostile-{round_}-{hostile}"
                hostile += 1
                stream.producer.produce(topic, key=order_id, value=value, headers=[
                    ("id", str(uuid.uuid4()).encode()), ("eventType", b"OrderCreated"), ("case", name.encode())])
        stream.flush()
        wait_for(lambda: applied(group) == stream.orders and
                 ConsumerDeadLetter.objects.filter(group_id=group).count() == hostile,
                 timeout=120, interval=0.5, message="every good event applied and every hostile one dead-lettered")
        assert stream.projection_matches()
        assert all(p.poll() is None for p in processes), "a consumer exited"
        ends: dict[int, int] = {}  # the next offset of each partition (Tansu's watermark counts batches)
        for record in read_topic(broker.bootstrap, topic):
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        wait_for(lambda: committed_offsets(broker, topic, group) == ends, timeout=30, interval=0.5,
                 message="every offset committed (the lag back to 0)")
    finally:
        outputs = [finish(p) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
