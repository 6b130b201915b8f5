"""The relay against a cluster that misbehaves like a real one (librdkafka's mock cluster, three brokers):
leader moves, retriable produce errors, fatal idempotence errors, brokers down, a refusal for good. Real
MariaDB, real Kafka protocol; the relay runs in this process (the real processes: tests/test_chaos_cluster.py).

Each: every event reaches the topic in per-order order, nothing is dead-lettered but the refusal, and the
producer's own failures cost no attempt.
"""

import logging

import pytest

from ops import metrics
from outbox.models import FailedEvent, OutboxEvent
from relay import kafka
from relay.services import dead_letters_retry, relay_publish_batch
from tests.kafka_tools import read_topic, wait_for
from tests.relay.helpers import TOPIC, enqueue, make_due, relay_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_retries")]


def enqueue_orders(prefix: str, orders: int) -> list[OutboxEvent]:
    events = []
    for n in range(orders):
        events.append(enqueue(f"{prefix}-{n}", "OrderCreated"))
    for n in range(0, orders, 2):
        events.append(enqueue(f"{prefix}-{n}", "OrderCancelled"))
    return events


def assert_all_on_topic_in_order(cluster, events: list[OutboxEvent]) -> None:
    keys = {e.aggregate_id for e in events}
    ids = {str(e.event_id) for e in events}
    records = read_topic(cluster.bootstrap, TOPIC, keys=keys, timeout=30,
                         until=lambda rs: ids <= {r.headers["id"] for r in rs})
    first_seen: dict[str, int] = {}
    for index, record in enumerate(sorted(records, key=lambda r: (r.partition, r.offset))):
        first_seen.setdefault(record.headers["id"], index)
    for key in keys:
        of_order = sorted((e for e in events if e.aggregate_id == key), key=lambda e: e.id)
        positions = [first_seen[str(e.event_id)] for e in of_order]
        assert positions == sorted(positions), f"order {key}: events reached the topic out of order"
    assert {r.partition for r in records if r.key == events[0].aggregate_id} == {
        r.partition for r in records if r.key == events[0].aggregate_id}


def relay_all_sent(events, timeout=60):
    ids = [e.id for e in events]
    relay_until(lambda: (make_due() or True) and OutboxEvent.objects.filter(id__in=ids, status="sent").count() == len(ids),
                timeout=timeout, message=f"all {len(ids)} events sent")


def test_leader_moves_lose_nothing_and_keep_order(on_mock_cluster):
    events = enqueue_orders("leader", 30)
    relay_publish_batch()
    for _ in range(3):
        on_mock_cluster.move_leaders()
        events += enqueue_orders(f"leader{_}", 10)
        relay_publish_batch()
    relay_all_sent(events)
    assert not FailedEvent.objects.exists()
    assert_all_on_topic_in_order(on_mock_cluster, events)


@pytest.mark.parametrize("error", ["NOT_ENOUGH_REPLICAS", "REQUEST_TIMED_OUT", "NOT_LEADER_OR_FOLLOWER",
                                   "NOT_ENOUGH_REPLICAS_AFTER_APPEND"])
def test_retriable_produce_errors_never_dead_letter(on_mock_cluster, settings, error):
    settings.OUTBOX_MAX_ATTEMPTS = 1  # even so: a retriable error is never the event's fault
    on_mock_cluster.call("push_errors", api="Produce", errors=[error] * 30)
    events = enqueue_orders(f"retriable-{error}", 20)
    relay_all_sent(events)
    assert not FailedEvent.objects.exists()
    assert_all_on_topic_in_order(on_mock_cluster, events)


@pytest.mark.parametrize("error", ["OUT_OF_ORDER_SEQUENCE_NUMBER", "UNKNOWN_PRODUCER_ID"])
def test_a_fatal_idempotence_error_rebuilds_the_producer_and_costs_no_attempt(on_mock_cluster, settings, error, caplog):
    """The seen failure: after a leader move the broker answers with a sequence error; librdkafka raises a fatal
    error; the old relay kept the broken producer and dead-lettered every later event at once."""
    settings.OUTBOX_MAX_ATTEMPTS = 1
    warm = enqueue_orders(f"warm-{error}", 2)
    relay_all_sent(warm)
    rebuilt, fatal_before = metrics.PRODUCER_REBUILT._value.get(), metrics.PRODUCER_FATAL_ERRORS._value.get()
    broken = kafka.producer.get()
    caplog.set_level(logging.WARNING)

    on_mock_cluster.call("push_errors", api="Produce", errors=[error] * 3)
    events = enqueue_orders(f"fatal-{error}", 20)
    relay_publish_batch()
    relay_all_sent(events)

    assert not FailedEvent.objects.exists()
    if error == "OUT_OF_ORDER_SEQUENCE_NUMBER":  # librdkafka recovers an unknown producer id by itself
        assert kafka.producer.get() is not broken
        assert metrics.PRODUCER_REBUILT._value.get() > rebuilt
        assert metrics.PRODUCER_FATAL_ERRORS._value.get() > fatal_before
    # Sent on their first counted attempt: the producer's failure cost the events nothing.
    assert set(OutboxEvent.objects.filter(id__in=[e.id for e in events]).values_list("attempts", flat=True)) == {1}
    assert_all_on_topic_in_order(on_mock_cluster, warm + events)


def test_every_broker_down_for_longer_than_the_attempts_last_dead_letters_nothing(on_mock_cluster, settings):
    settings.OUTBOX_MAX_ATTEMPTS = 2
    settings.OUTBOX_PUBLISH_TIMEOUT = 1.0
    on_mock_cluster.call("broker_down", broker=-1)
    events = enqueue_orders("outage", 6)
    created = OutboxEvent.objects.filter(id__in=[e.id for e in events], event_type="OrderCreated")
    wait_for(lambda: (make_due() or relay_publish_batch()) and min(created.values_list("attempts", flat=True)) >= 4,
             timeout=60, message="every first event of an order past OUTBOX_MAX_ATTEMPTS")
    assert not OutboxEvent.objects.filter(status="dead").exists()
    assert all(row.failing_since is not None and row.status == "pending" for row in created)
    on_mock_cluster.call("broker_up", broker=-1)
    relay_all_sent(events)
    assert not FailedEvent.objects.exists()
    assert_all_on_topic_in_order(on_mock_cluster, events)


def test_one_broker_down_then_its_partitions_move_and_it_comes_back(on_mock_cluster):
    on_mock_cluster.call("broker_down", broker=2)
    events = enqueue_orders("one-down", 20)
    relay_publish_batch()
    on_mock_cluster.move_leaders(avoid=[2])  # the cluster elects new leaders
    relay_all_sent(events)
    on_mock_cluster.call("broker_up", broker=2)
    more = enqueue_orders("one-back", 10)
    relay_all_sent(more)
    assert not FailedEvent.objects.exists()
    assert_all_on_topic_in_order(on_mock_cluster, events + more)


def test_a_refusal_for_good_dead_letters_at_once_and_a_refused_dlq_publish_is_kept(on_mock_cluster, settings, caplog):
    caplog.set_level(logging.CRITICAL)
    settings.OUTBOX_MAX_ATTEMPTS = 5
    warm = enqueue_orders("warm-refusal", 1)
    relay_all_sent(warm)
    event = enqueue("refused-1", "OrderCreated")
    # The event's produce request and the DLQ's (with its value, then without) are all refused.
    on_mock_cluster.call("push_errors", api="Produce", errors=["TOPIC_AUTHORIZATION_FAILED"] * 3)
    result = relay_publish_batch()
    assert result.dead == 1
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("dead", 1)
    failed = FailedEvent.objects.get(event_id=event.event_id)
    assert failed.status == FailedEvent.Status.DLQ_PENDING and "TOPIC_AUTHORIZATION_FAILED" in failed.dlq_error
    assert any(str(event.event_id) in r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL)

    def sweep() -> bool:  # until the client's cached refusal of the topic has been refreshed away
        FailedEvent.objects.filter(pk=failed.pk).update(dlq_next_attempt_at=failed.failed_at)
        dead_letters_retry()
        failed.refresh_from_db()
        return failed.status == FailedEvent.Status.DEAD_LETTERED

    wait_for(sweep, timeout=60, interval=1, message="the sweeper's DLQ publish")
    read_topic(on_mock_cluster.bootstrap, "outbox.dlq", keys={"refused-1"}, until=lambda rs: len(rs) == 1)
