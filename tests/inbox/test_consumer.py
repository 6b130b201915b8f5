"""The idempotent consumer against the real broker and database."""

import json
import signal
import subprocess
import sys
import threading
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from django.db.models import Sum

from inbox.consumer import EventConsumer
from inbox.models import ConsumerDeadLetter, ProcessedEvent
from orders.models import Order
from relay.services import relay_run
from stats.models import CustomerStats
from tests.contract import assert_matches_contract
from tests.kafka_tools import read_topic, wait_for
from tests.processes import suite_env
from tests.testhandlers import handlers as test_handlers

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def topic(broker):
    name = f"test-events-{uuid.uuid4().hex[:8]}"
    broker.create_topics(name, partitions=1)
    return name


@pytest.fixture
def dlq(broker):
    name = f"test-dlq-{uuid.uuid4().hex[:8]}"
    broker.create_topics(name, partitions=1)
    return name


def produce(bootstrap, topic, *, value, headers, key="1"):
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    producer.produce(topic, key=key, value=body, headers=[(k, v.encode()) for k, v in headers.items()])
    assert producer.flush(10) == 0


def event_headers(event_type="OrderCreated", event_id=None):
    return {"id": event_id or str(uuid.uuid4()), "eventType": event_type, "aggregateType": "order",
            "aggregateId": "1", "occurredAt": "2026-01-01T00:00:00+00:00"}


def created(customer="c-1", total="10.00", **extra):
    return {"order_id": "1", "customer_id": customer, "total": total, "items": [], **extra}


def consume(topic, dlq, *, expect: int, max_attempts=3) -> EventConsumer:
    consumer = EventConsumer(group_id=f"test-{uuid.uuid4().hex[:8]}", topics=[topic], dlq_topic=dlq,
                             max_attempts=max_attempts, backoff_base=0.01)
    consumer.run(max_messages=expect, idle_timeout=30)
    return consumer


def outcome(consumer: EventConsumer) -> dict:
    return {key: consumer.stats[key] for key in ("applied", "duplicates", "dead_lettered")}


def stats(customer="c-1"):
    return CustomerStats.objects.get(customer_id=customer)


def test_same_event_delivered_twice_is_applied_once(broker, topic, dlq):
    headers = event_headers()
    produce(broker.bootstrap, topic, value=created(), headers=headers)
    produce(broker.bootstrap, topic, value=created(), headers=headers)

    consumer = consume(topic, dlq, expect=2)

    assert outcome(consumer) == {"applied": 1, "duplicates": 1, "dead_lettered": 0}
    assert (stats().orders_created, stats().total_spent) == (1, Decimal("10.00"))
    assert ProcessedEvent.objects.filter(event_id=headers["id"]).count() == 1


@pytest.mark.parametrize(
    "value, headers, error",
    [
        (b"{not json", event_headers(), "not JSON"),
        (created(), {k: v for k, v in event_headers().items() if k != "id"}, "missing 'id'"),
        (created(), event_headers(event_type="OrderTeleported"), "no handler"),
        (b"[1, 2]", event_headers(), "not a JSON object"),
        (created(), {k: v for k, v in event_headers().items() if k != "eventType"}, "missing 'eventType'"),
    ],
    ids=["bad-json", "missing-id", "unknown-type", "not-an-object", "missing-event-type"],
)
def test_poison_message_between_two_good_ones_goes_to_the_dlq_and_the_partition_moves_on(broker, topic, dlq, value, headers, error):
    produce(broker.bootstrap, topic, value=created(total="1.00"), headers=event_headers())
    produce(broker.bootstrap, topic, value=value, headers=headers)
    produce(broker.bootstrap, topic, value=created(total="2.00"), headers=event_headers())

    consumer = consume(topic, dlq, expect=3)

    assert outcome(consumer) == {"applied": 2, "duplicates": 0, "dead_lettered": 1}
    assert (stats().orders_created, stats().total_spent) == (2, Decimal("3.00"))
    dead = ConsumerDeadLetter.objects.get()
    assert error in dead.error and dead.offset == 1 and dead.dlq_published
    (record,) = read_topic(broker.bootstrap, dlq, until=lambda rs: len(rs) >= 1)
    assert record.value == (value if isinstance(value, bytes) else json.dumps(value).encode())
    assert error in record.headers["dlq.error"]
    assert {k: v for k, v in record.headers.items() if not k.startswith("dlq.")} == headers  # the original ones
    assert record.headers["dlq.originalTopic"] == topic and record.headers["dlq.originalOffset"] == "1"
    assert record.headers["dlq.originalPartition"] == "0" and record.headers["dlq.attempts"] == "1"
    assert record.headers["dlq.consumerGroup"] == consumer.group_id
    assert datetime.fromisoformat(record.headers["dlq.failedAt"]).tzinfo is not None
    assert record.key == "1"
    assert_matches_contract(record, message="ConsumerDeadLetter")


def test_duplicates_inside_one_batch_are_applied_once(broker, topic, dlq):
    twice, thrice = event_headers(), event_headers()
    for headers, total in ((twice, "1.00"), (thrice, "2.00"), (twice, "1.00"), (event_headers(), "4.00"),
                           (thrice, "2.00"), (thrice, "2.00")):
        produce(broker.bootstrap, topic, value=created(total=total), headers=headers)

    consumer = consume(topic, dlq, expect=6)

    assert consumer.stats["batches"] == 1  # all six were there when the consumer started: one transaction
    assert outcome(consumer) == {"applied": 3, "duplicates": 3, "dead_lettered": 0}
    assert (stats().orders_created, stats().total_spent) == (3, Decimal("7.00"))
    assert list(ProcessedEvent.objects.order_by("id").values_list("offset", flat=True)) == [0, 1, 3]


def test_a_batch_of_recorded_and_new_ids_applies_only_the_new_ones_in_one_transaction(broker, topic, dlq):
    group_id, seen = f"test-{uuid.uuid4().hex[:8]}", event_headers()
    produce(broker.bootstrap, topic, value=created(total="1.00"), headers=seen)
    EventConsumer(group_id=group_id, topics=[topic], dlq_topic=dlq, max_attempts=3, backoff_base=0.01).run(
        max_messages=1, idle_timeout=30)
    # Redelivered (a producer that retried, a replay) next to new ones: the batch's insert hits the recorded id.
    for headers, total in ((event_headers(), "2.00"), (seen, "1.00"), (event_headers(), "4.00")):
        produce(broker.bootstrap, topic, value=created(total=total), headers=headers)

    consumer = EventConsumer(group_id=group_id, topics=[topic], dlq_topic=dlq, max_attempts=3, backoff_base=0.01)
    consumer.run(max_messages=3, idle_timeout=30)

    assert outcome(consumer) == {"applied": 2, "duplicates": 1, "dead_lettered": 0}
    assert (consumer.stats["batches"], consumer.stats["batch_fallbacks"]) == (1, 0)
    assert (stats().orders_created, stats().total_spent) == (3, Decimal("7.00"))
    assert list(ProcessedEvent.objects.filter(group_id=group_id).order_by("offset").values_list("offset", flat=True)) \
        == [0, 1, 3]


def test_a_message_with_only_cloudevents_headers_is_applied(broker, topic, dlq):
    from cloudevents.core.bindings.kafka import to_binary_event
    from cloudevents.core.v1.event import CloudEvent

    event_id = str(uuid.uuid4())
    message = to_binary_event(CloudEvent(
        {"id": event_id, "source": "/another-producer", "type": "OrderCreated", "specversion": "1.0",
         "datacontenttype": "application/json", "partitionkey": "1"}, created(total="3.00")))
    assert "id" not in message.headers and "eventType" not in message.headers
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, key=message.key, value=message.value, headers=list(message.headers.items()))
    assert producer.flush(10) == 0

    consumer = consume(topic, dlq, expect=1)

    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 0}
    assert (stats().orders_created, stats().total_spent) == (1, Decimal("3.00"))
    assert ProcessedEvent.objects.get().event_id == event_id


AWKWARD = ["o'brien", 'say "hi"', "back\\slash", "100%s %d", "'); DROP TABLE stats_customerstats; --",
           "ünïcødé ✓ 😀", "tab\tand\nnewline"]


def test_values_the_batch_writes_into_its_statements_arrive_as_sent(broker, topic, dlq):
    """The batch's statements carry their values as driver-escaped literals: quotes, backslashes, percent signs,
    non-ASCII text in customer and event ids are stored exactly, and amounts stay exact decimals."""
    ids = [f"id-{name}"[:64] for name in AWKWARD]
    for customer, event_id in zip(AWKWARD, ids):
        produce(broker.bootstrap, topic, value=created(customer=customer, total="12345678.91"),
                headers=event_headers(event_id=event_id))
    produce(broker.bootstrap, topic, value=created(customer=AWKWARD[0], total="0.09"),
            headers=event_headers(event_type="OrderCancelled"))

    consumer = consume(topic, dlq, expect=len(AWKWARD) + 1)

    assert consumer.stats["batches"] == 1 and outcome(consumer)["applied"] == len(AWKWARD) + 1
    assert {s.customer_id: s.total_spent for s in CustomerStats.objects.all()} == {
        customer: Decimal("12345678.91") - (Decimal("0.09") if customer == AWKWARD[0] else 0) for customer in AWKWARD
    }
    assert set(ProcessedEvent.objects.filter(group_id=consumer.group_id).values_list("event_id", flat=True)) >= set(ids)


def test_a_failing_message_in_the_middle_of_a_batch_costs_only_itself(broker, topic, dlq):
    test_handlers.calls.clear()
    for n in range(3):
        produce(broker.bootstrap, topic, value=created(total=f"{n + 1}.00"), headers=event_headers())
    produce(broker.bootstrap, topic, value=created(), headers=event_headers("TestBroken"))
    for n in range(3):
        produce(broker.bootstrap, topic, value=created(total=f"{n + 10}.00"), headers=event_headers())

    consumer = consume(topic, dlq, expect=7, max_attempts=2)

    assert consumer.stats["batches"] == 1 and consumer.stats["batch_fallbacks"] == 1
    assert outcome(consumer) == {"applied": 6, "duplicates": 0, "dead_lettered": 1}
    assert (stats().orders_created, stats().total_spent) == (6, Decimal("39.00"))  # each of the others once
    # Applied one at a time, in offset order, around the one that failed.
    assert list(ProcessedEvent.objects.order_by("id").values_list("offset", flat=True)) == [0, 1, 2, 4, 5, 6]
    dead = ConsumerDeadLetter.objects.get()
    assert (dead.offset, dead.attempts) == (3, 2)
    assert test_handlers.calls["TestBroken"] == 1 + 2  # the batch's try, then its two attempts alone


def test_a_batch_that_fails_for_good_stops_the_later_ones_and_commits_nothing(broker, topic, dlq, monkeypatch):
    """The writer applies batch after batch while the main thread takes the next: when one fails for good (the
    database gone while the consumer stops), the one already handed over behind it must not be applied, or a
    partition's events would apply out of order after the restart."""
    from django.db import OperationalError

    import inbox.writer

    for n in range(2):
        produce(broker.bootstrap, topic, value=created(total=f"{n + 1}.00"), headers=event_headers())
    consumer = EventConsumer(group_id=f"test-{uuid.uuid4().hex[:8]}", topics=[topic], dlq_topic=dlq,
                             max_attempts=3, backoff_base=0.01, batch_size=1)
    applied_for_real = inbox.writer.inbound_events_apply

    def database_lost_while_stopping(*, group_id, batch):
        (event, raw), = batch
        if raw.offset == 0:
            # The second batch has been taken and handed to the writer meanwhile.
            wait_for(lambda: len(consumer.handoff.in_flight) == 2, timeout=30, message="the next batch handed over")
            consumer.stopping = True
            raise OperationalError(2013, "Lost connection to server during query")
        return applied_for_real(group_id=group_id, batch=batch)

    monkeypatch.setattr(inbox.writer, "inbound_events_apply", database_lost_while_stopping)
    with pytest.raises(OperationalError):
        consumer.run(max_messages=2, idle_timeout=30)

    assert not ProcessedEvent.objects.exists()  # neither the failed batch nor the one behind it
    assert not CustomerStats.objects.exists()
    probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": consumer.group_id})
    try:
        assert [tp.offset for tp in probe.committed([TopicPartition(topic, 0)], timeout=10)] == [-1001]
    finally:
        probe.close()


def test_an_unwritable_dlq_topic_keeps_the_dead_letter_in_the_database(broker, topic, caplog):
    produce(broker.bootstrap, topic, value=b"{not json", headers=event_headers())
    produce(broker.bootstrap, topic, value=created(), headers=event_headers())

    consumer = consume(topic, "no such topic: spaces are not allowed", expect=2)

    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 1}
    dead = ConsumerDeadLetter.objects.get()
    assert not dead.dlq_published and dead.offset == 0 and "not JSON" in dead.error
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert critical and f"{topic}[0]@0" in critical[0].getMessage() and "kept in the database" in critical[0].getMessage()


def test_transient_handler_failure_succeeds_on_retry(broker, topic, dlq):
    test_handlers.calls.clear()
    test_handlers.fail_times["TestFlaky"] = 2
    produce(broker.bootstrap, topic, value=created(), headers=event_headers("TestFlaky"))

    consumer = consume(topic, dlq, expect=1, max_attempts=3)

    assert test_handlers.calls["TestFlaky"] == 3
    assert consumer.stats["applied"] == 1
    assert stats().orders_created == 1  # failed attempts rolled back, the third applied once
    assert not ConsumerDeadLetter.objects.exists()


def test_handler_that_always_fails_is_dead_lettered_after_the_configured_attempts(broker, topic, dlq):
    test_handlers.calls.clear()
    produce(broker.bootstrap, topic, value=created(), headers=event_headers("TestBroken"))
    produce(broker.bootstrap, topic, value=created(), headers=event_headers())

    consumer = consume(topic, dlq, expect=2, max_attempts=4)

    # Its batch's try (which does not count as an attempt: the batch is then applied one message at a time),
    # then the configured attempts alone.
    assert consumer.stats["batch_fallbacks"] == 1
    assert test_handlers.calls["TestBroken"] == 1 + 4
    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 1}
    dead = ConsumerDeadLetter.objects.get()
    assert dead.attempts == 4 and "always fails" in dead.error
    assert not ProcessedEvent.objects.filter(event_type="TestBroken").exists()
    (record,) = read_topic(broker.bootstrap, dlq, until=lambda rs: len(rs) >= 1)
    assert record.headers["dlq.attempts"] == "4"


def consumer_process(broker, topic, dlq, group, *args):
    env = suite_env(broker, KAFKA_CONSUMER_CONFIG=json.dumps({"session.timeout.ms": 6000}),
                    INBOX_GROUP_ID=group, INBOX_TOPICS=topic, INBOX_DLQ_TOPIC=dlq)
    return subprocess.Popen([sys.executable, "manage.py", "consume_events", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_consumer_killed_after_db_commit_before_offset_commit_skips_the_redelivery(broker, topic, dlq, tmp_path):
    marker = tmp_path / "crash-once"
    marker.touch()
    group = f"test-{uuid.uuid4().hex[:8]}"
    event = event_headers("TestCrashAfterCommit")
    produce(broker.bootstrap, topic, value=created(crash_marker=str(marker)), headers=event)

    first = consumer_process(broker, topic, dlq, group)
    assert first.wait(60) == -signal.SIGKILL  # killed itself right after the database commit
    assert not marker.exists()
    assert ProcessedEvent.objects.filter(event_id=event["id"]).count() == 1
    assert stats().orders_created == 1

    second = consumer_process(broker, topic, dlq, group, "--max-messages", "1")
    output, _ = second.communicate(timeout=90)
    assert second.returncode == 0, output
    assert "'duplicates': 1" in output and "'applied': 0" in output  # redelivered, and skipped
    assert stats().orders_created == 1


def test_sigterm_finishes_commits_and_exits_zero(broker, topic, dlq):
    group = f"test-{uuid.uuid4().hex[:8]}"
    produce(broker.bootstrap, topic, value=created(), headers=event_headers())
    process = consumer_process(broker, topic, dlq, group)
    wait_for(lambda: ProcessedEvent.objects.exists(), timeout=60, interval=0.2, message="event applied")

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)

    assert process.returncode == 0, output
    probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        (committed,) = probe.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        probe.close()
    assert committed.offset == 1


def test_projection_built_from_events_equals_the_truth_from_the_orders_table(api, broker, dlq, settings):
    settings.OUTBOX_TOPIC_PREFIX = f"test-{uuid.uuid4().hex[:8]}."
    topic = settings.OUTBOX_TOPIC_PREFIX + "order"
    broker.create_topics(topic)
    ids = []
    for i in range(12):
        body = {"customer_id": f"c-{i % 3}", "items": [{"sku": "A", "quantity": i + 1, "unit_price": "1.25"}]}
        ids.append(api.post("/api/orders/", body, format="json").json()["id"])
    for order_id in ids[::4]:
        assert api.post(f"/api/orders/{order_id}/cancel/").status_code == 200
    relay_run()

    consume(topic, dlq, expect=len(ids) + len(ids[::4]))

    for customer in ["c-0", "c-1", "c-2"]:
        orders = Order.objects.filter(customer_id=customer)
        truth = {
            "orders_created": orders.count(),
            "orders_cancelled": orders.filter(status="cancelled").count(),
            "total_spent": str(orders.filter(status="created").aggregate(s=Sum("total"))["s"] or Decimal("0.00")),
        }
        projected = api.get(f"/api/customers/{customer}/stats/").json()
        assert projected == {"customer_id": customer, **truth}


def test_a_server_error_caused_by_the_message_is_dead_lettered_not_retried_forever(broker, topic, dlq):
    produce(broker.bootstrap, topic, value=created(), headers=event_headers("TestServerError"))
    produce(broker.bootstrap, topic, value=created(), headers=event_headers())

    consumer = consume(topic, dlq, expect=2, max_attempts=2)

    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 1}
    assert "Incorrect decimal value" in ConsumerDeadLetter.objects.get().error


def test_fifty_poison_messages_with_the_dlq_topic_unwritable_all_kept_and_the_partition_moves_on(broker, topic):
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 20})
    for n in range(50):
        producer.produce(topic, key=str(n), value=b"{not json",
                         headers=[(k, v.encode()) for k, v in event_headers().items()])
    producer.produce(topic, key="1", value=json.dumps(created()).encode(),
                     headers=[(k, v.encode()) for k, v in event_headers().items()])
    assert producer.flush(10) == 0

    consumer = consume(topic, "no such topic: spaces are not allowed", expect=51)

    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 50}
    dead = ConsumerDeadLetter.objects.filter(topic=topic)
    assert dead.count() == 50 and not dead.filter(dlq_published=True).exists()
    assert sorted(dead.values_list("offset", flat=True)) == list(range(50))


def test_a_stuck_handler_shows_in_the_lag_and_the_seconds_since_applied_while_the_consumer_keeps_polling(broker, topic, dlq, tmp_path):
    from ops import metrics

    entered, release = tmp_path / "entered", tmp_path / "release"
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    held = event_headers("TestHold")
    producer.produce(topic, key="1", value=json.dumps(created(entered=str(entered), release=str(release))).encode(),
                     headers=[(k, v.encode()) for k, v in held.items()])
    assert producer.flush(10) == 0
    for _ in range(4):  # one request each: a broker that counts batches in its watermark counts these right too
        produce(broker.bootstrap, topic, value=created(), headers=event_headers())
    consumer = EventConsumer(group_id=f"test-{uuid.uuid4().hex[:8]}", topics=[topic], dlq_topic=dlq,
                             max_attempts=1, backoff_base=0.01, batch_size=1)
    gauge = lambda metric, *labels: metric.labels(consumer.group_id, *labels)._value.get()  # noqa: E731
    runner = threading.Thread(target=consumer.run, kwargs={"max_messages": 5, "idle_timeout": 30})
    runner.start()
    try:
        wait_for(entered.exists, timeout=30, message="the consumer to hold the first event")
        # Nothing committed while the handler is stuck: the lag is the whole partition, asked of the broker.
        wait_for(lambda: gauge(metrics.INBOX_LAG, topic, "0") == 5, timeout=20, interval=0.2, message="lag 5")
        # The handler is stuck, not the consumer: it keeps polling (partitions paused) and stays in its group,
        # while the seconds since it last applied a batch grow (the ConsumerStalled alert's second condition).
        wait_for(lambda: gauge(metrics.INBOX_SINCE_APPLIED) >= 3, timeout=20, interval=0.2,
                 message="seconds since the last apply to grow")
        assert gauge(metrics.INBOX_SINCE_POLL) < 3
    finally:
        release.touch()
        runner.join(60)
    assert outcome(consumer) == {"applied": 5, "duplicates": 0, "dead_lettered": 0}


HOSTILE_VALUES = {
    "nested 5,000 deep": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "a 5,000-digit number": b'{"order_id": "1", "customer_id": "c-1", "total": ' + b"9" * 5000 + b', "items": []}',
    "invalid UTF-8": b'{"order_id": "1", "customer_id": "c-\xff", "total": "1.00", "items": []}',
    "empty": b"",
    "1 MB": b'{"pad": "' + b"x" * (1024 * 1024) + b'"}',
    "a JSON array": b"[1, 2, 3]",
    "fields of the wrong types": b'{"order_id": ["1"], "customer_id": {"x": 1}, "total": "ten", "items": 5}',
}


def test_hostile_messages_between_good_ones_are_dead_lettered_and_the_partition_moves_on(broker, topic, dlq):
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 2_000_000})
    good = []
    for name, value in HOSTILE_VALUES.items():
        good.append(str(uuid.uuid4()))
        producer.produce(topic, key="1", value=json.dumps(created(total="1.00")).encode(),
                         headers=[(k, v.encode()) for k, v in event_headers(event_id=good[-1]).items()])
        producer.produce(topic, key="1", value=value,
                         headers=[(k, v.encode()) for k, v in event_headers().items()] + [("case", name.encode())])
    assert producer.flush(20) == 0

    consumer = consume(topic, dlq, expect=2 * len(HOSTILE_VALUES))

    assert consumer.stats["applied"] == len(good)
    assert set(ProcessedEvent.objects.values_list("event_id", flat=True)) == set(good)
    dead = ConsumerDeadLetter.objects.all()
    assert {d.headers.get("case") for d in dead} >= set(HOSTILE_VALUES)
    assert consumer.stats["dead_lettered"] == len(HOSTILE_VALUES) == dead.count()
    assert all(d.error for d in dead)


def test_a_redelivered_dead_letter_is_not_retried_again(broker, topic, dlq):
    produce(broker.bootstrap, topic, value=created(), headers=event_headers("TestBroken"))
    first = consume(topic, dlq, expect=1, max_attempts=2)
    assert first.stats["dead_lettered"] == 1
    record = ConsumerDeadLetter.objects.get()

    # Read again (its offset was never committed, say), here by a consumer of a new group that inherits the
    # record: the batch fails once, and the message goes straight to its known dead letter, no retries.
    group = f"test-{uuid.uuid4().hex[:8]}"
    ConsumerDeadLetter.objects.filter(pk=record.pk).update(group_id=group)
    calls_before = test_handlers.calls.get("TestBroken", 0)
    again = EventConsumer(group_id=group, topics=[topic], dlq_topic=dlq, max_attempts=5, backoff_base=0.01)
    again.run(max_messages=1, idle_timeout=30)
    assert again.stats["dead_lettered"] == 1
    assert test_handlers.calls["TestBroken"] - calls_before == 1  # the batch's one try, no retries
    assert ConsumerDeadLetter.objects.count() == 1


def test_a_batch_longer_than_max_poll_interval_keeps_the_consumer_in_its_group(broker, topic, dlq, settings):
    """300 handler-failing events: the writer's retries and dead letters take far longer than
    max.poll.interval.ms (6 s here). The main thread keeps polling, partitions paused, so the group keeps the
    consumer and its offsets commit: nothing is read and retried again."""
    from inbox.kafka import build_offsets_reader

    settings.KAFKA_CONSUMER_CONFIG = {"session.timeout.ms": 6000, "max.poll.interval.ms": 6000}
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 50})
    for _ in range(300):
        producer.produce(topic, key="1", value=json.dumps(created()).encode(),
                         headers=[(k, v.encode()) for k, v in event_headers("TestBroken").items()])
    producer.produce(topic, key="1", value=json.dumps(created()).encode(),
                     headers=[(k, v.encode()) for k, v in event_headers().items()])
    assert producer.flush(20) == 0

    consumer = EventConsumer(group_id=f"test-{uuid.uuid4().hex[:8]}", topics=[topic], dlq_topic=dlq,
                             max_attempts=3, backoff_base=0.02, batch_size=100)  # the next batches wait
    consumer.run(max_messages=301, idle_timeout=30)

    assert (consumer.stats["dead_lettered"], consumer.stats["applied"]) == (300, 1)
    assert ConsumerDeadLetter.objects.count() == 300
    reader = build_offsets_reader(group_id=consumer.group_id)
    try:
        (committed,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        reader.close()
    assert committed.offset == 301  # every offset committed by the member the group kept


def test_a_database_read_only_for_a_while_is_waited_out_not_dead_lettered(broker, topic, dlq):
    test_handlers.calls.pop("TestReadOnlyTwice", None)
    produce(broker.bootstrap, topic, value=created(total="3.00"), headers=event_headers("TestReadOnlyTwice"))
    consumer = consume(topic, dlq, expect=1, max_attempts=1)
    assert outcome(consumer) == {"applied": 1, "duplicates": 0, "dead_lettered": 0}
    assert test_handlers.calls["TestReadOnlyTwice"] == 3


def test_the_topic_recreated_after_a_dead_letter_a_new_message_at_the_same_offset_is_a_new_dead_letter(broker_outage):
    """The broker comes back empty and the topic is created again: offsets restart at 0. A new poison message
    at the offset of an old dead letter is stored with its own contents and written to the DLQ topic."""
    topic, dlq, group = (f"test-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("events", "dlq", "group"))
    broker_outage.create_topics(topic, dlq, partitions=1)
    produce(broker_outage.bootstrap, topic, value=b"[1]", headers=event_headers())
    first = EventConsumer(group_id=group, topics=[topic], dlq_topic=dlq, max_attempts=1, backoff_base=0.01)
    first.run(max_messages=1, idle_timeout=30)

    broker_outage.stop()
    broker_outage.start()
    broker_outage.create_topics(topic, dlq, partitions=1)
    produce(broker_outage.bootstrap, topic, value=b"[2]", headers=event_headers())
    second = EventConsumer(group_id=group, topics=[topic], dlq_topic=dlq, max_attempts=1, backoff_base=0.01)
    second.run(max_messages=1, idle_timeout=30)

    old, new = ConsumerDeadLetter.objects.filter(group_id=group).order_by("id")
    assert (old.offset, new.offset) == (0, 0) and (old.value, new.value) == ("[1]", "[2]")
    assert new.dlq_published
    (copy,) = read_topic(broker_outage.bootstrap, dlq, until=lambda rs: len(rs) >= 1)
    assert copy.value == b"[2]"
