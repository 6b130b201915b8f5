"""Per-order order: unit level with a scripted producer, and against the real broker."""

import pytest
from django.db import transaction
from django.utils import timezone

from outbox.models import FailedEvent, OutboxEvent
from relay import kafka
from relay.claim import _claim
from relay.ordering import split_by_aggregate_order
from relay.services import relay_publish_batch
from tests.kafka_tools import high_watermarks, read_topic, wait_for
from tests.relay.helpers import ORDER, RETRIABLE, TOO_LARGE, TOPIC, enqueue, make_due, relay_until


@pytest.mark.django_db
@pytest.mark.parametrize("earlier_rows_read", [1000, 0], ids=["earlier rows read", "table asked by order"])
def test_later_event_waits_behind_one_in_backoff_and_others_flow(producer, monkeypatch, earlier_rows_read):
    monkeypatch.setattr("relay.ordering.EARLIER_ROWS_READ", earlier_rows_read)  # both ways of finding blockers
    producer.failing["1", "OrderCreated"] = RETRIABLE
    enqueue("1", "OrderCreated")
    assert relay_publish_batch().retried == 1
    enqueue("1", "OrderCancelled")
    enqueue("2", "OrderCreated")

    result = relay_publish_batch()

    assert (result.sent, result.held) == (1, 1)
    created, cancelled = OutboxEvent.objects.filter(aggregate_id="1").order_by("id")
    assert cancelled.status == "pending" and cancelled.attempts == 0
    assert cancelled.available_at == created.available_at  # parked until the blocker's retry time
    assert producer.events() == [("1", "OrderCreated"), ("2", "OrderCreated")]

    del producer.failing["1", "OrderCreated"]
    make_due()
    relay_publish_batch()  # the retried Created alone: after a failure, one event per order at a time
    relay_publish_batch()
    assert producer.events()[-2:] == [("1", "OrderCreated"), ("1", "OrderCancelled")]
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {"sent"}


@pytest.mark.django_db
def test_in_one_batch_a_later_event_is_not_marked_sent_when_an_earlier_one_of_its_order_failed(producer):
    """librdkafka may write a later message of a partition after an earlier one timed out (a gap): the later
    event stays pending and goes again after its predecessor; other orders are not held."""
    producer.failing["1", "OrderCreated"] = RETRIABLE
    created, cancelled, other = enqueue("1", "OrderCreated"), enqueue("1", "OrderCancelled"), enqueue("2", "OrderCreated")

    result = relay_publish_batch()

    assert (result.sent, result.retried, result.held) == (1, 1, 1)
    assert producer.events() == [("1", "OrderCreated"), ("1", "OrderCancelled"), ("2", "OrderCreated")]
    statuses = dict(OutboxEvent.objects.values_list("id", "status"))
    assert (statuses[created.id], statuses[cancelled.id], statuses[other.id]) == ("pending", "pending", "sent")
    cancelled.refresh_from_db()
    assert cancelled.attempts == 0 and cancelled.kafka_offset == -1

    del producer.failing["1", "OrderCreated"]
    make_due()
    while OutboxEvent.objects.filter(status="pending").exists():
        relay_publish_batch()
        make_due()
    # Published again in order (the first Cancelled was a duplicate ahead of its Created, which consumers skip).
    assert producer.events()[3:] == [("1", "OrderCreated"), ("1", "OrderCancelled")]


@pytest.mark.django_db
def test_while_publishes_fail_one_event_per_order_is_in_flight(producer):
    """After a failed publish (or for rows already retried), a batch sends only the first event of each order;
    the next batch sends the next, so a timed-out message cannot leave a later one of its order behind it."""
    producer.failing["0", "OrderCreated"] = RETRIABLE
    enqueue("0", "OrderCreated")
    relay_publish_batch()  # fails: this process's producer is now troubled
    for order in ("1", "2"):
        enqueue(order, "OrderCreated")
        enqueue(order, "OrderCancelled")
    assert kafka.producer.troubled
    first = relay_publish_batch()
    assert (first.sent, first.held) == (2, 2)
    assert producer.events()[-2:] == [("1", "OrderCreated"), ("2", "OrderCreated")]
    second = relay_publish_batch()
    assert second.sent == 2
    assert producer.events()[-2:] == [("1", "OrderCancelled"), ("2", "OrderCancelled")]


@pytest.mark.django_db
def test_a_later_event_waits_while_an_earlier_one_is_in_another_lanes_batch():
    created, cancelled = enqueue("5", "OrderCreated"), enqueue("5", "OrderCancelled")
    other = enqueue("6", "OrderCreated")
    with transaction.atomic():
        now = timezone.now()
        rows = {row.id: row for row in _claim(now=now, batch_size=10)}
        # Another lane of this process holds the Created row: known in memory, no table look-up needed.
        ready, held = split_by_aggregate_order(
            [rows[cancelled.id], rows[other.id]], other_lanes=[rows[created.id]], now=now)
        assert [r.id for r in ready] == [other.id] and [r.id for r in held] == [cancelled.id]
        # The same without the lane's word for it: the table says the Created row is still pending.
        ready, held = split_by_aggregate_order(
            [rows[cancelled.id], rows[other.id]], other_lanes=[], now=now)
        assert [r.id for r in ready] == [other.id] and [r.id for r in held] == [cancelled.id]
    cancelled.refresh_from_db()
    assert cancelled.available_at <= timezone.now()  # held for the next claim, not parked


@pytest.mark.django_db
def test_non_retriable_error_dead_letters_at_once_then_later_events_proceed(producer):
    producer.failing["1", "OrderCreated"] = TOO_LARGE
    enqueue("1", "OrderCreated")
    enqueue("1", "OrderCancelled")

    result = relay_publish_batch()

    assert result.dead == 1
    created = OutboxEvent.objects.get(event_type="OrderCreated")
    assert created.status == "dead" and created.attempts == 1
    failed = FailedEvent.objects.get()
    assert failed.error == TOO_LARGE.error
    assert failed.status == FailedEvent.Status.DEAD_LETTERED
    assert [m.topic for m in producer.published].count("outbox.dlq") == 1
    # The cancel was in the same batch behind a row that is no longer pending: it went after it.
    assert OutboxEvent.objects.get(event_type="OrderCancelled").status == "sent"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_created_reaches_kafka_before_cancelled_when_its_first_attempt_failed(api, broker_outage, settings):
    # Long enough that the backoff cannot run out before the checks below on a slow machine; make_due() ends it.
    settings.OUTBOX_BACKOFF_BASE = settings.OUTBOX_BACKOFF_MAX = 30.0
    broker_outage.stop()
    held_order = api.post("/api/orders/", ORDER, format="json").json()["id"]
    assert relay_publish_batch().retried == 1  # OrderCreated fails: broker down
    broker_outage.start()
    start = high_watermarks(broker_outage.bootstrap, TOPIC)

    api.post(f"/api/orders/{held_order}/cancel/")  # committed while its Created waits in backoff
    other_order = api.post("/api/orders/", ORDER, format="json").json()["id"]
    wait_for(lambda: relay_publish_batch().sent >= 1 or OutboxEvent.objects.filter(aggregate_id=str(other_order), status="sent").exists(),
             timeout=20, interval=0.1, message="the other order published")
    assert OutboxEvent.objects.get(aggregate_id=str(other_order)).status == "sent"
    assert not OutboxEvent.objects.filter(aggregate_id=str(held_order), status="sent").exists()

    make_due()  # the Created's retry time has come
    relay_until(lambda: not OutboxEvent.objects.filter(status="pending").exists(), timeout=30, message="drained")
    both = {"OrderCreated", "OrderCancelled"}
    records = read_topic(broker_outage.bootstrap, TOPIC, start=start, keys={str(held_order)},
                         until=lambda rs: {r.headers["eventType"] for r in rs} == both)
    first_seen = dict.fromkeys((r.headers["id"], r.headers["eventType"]) for r in records)  # a late duplicate is no reorder
    assert [event_type for _, event_type in first_seen] == ["OrderCreated", "OrderCancelled"]


@pytest.mark.django_db(transaction=True)
def test_against_the_broker_a_later_event_goes_out_after_its_earlier_one_is_dead_lettered(broker):
    """The real broker's (client's) refusal of a too-large payload, not a scripted one: the order's next event
    is published after it, in the same batch."""
    from outbox.services import outbox_enqueue

    start = high_watermarks(broker.bootstrap, TOPIC)
    with transaction.atomic():
        big = outbox_enqueue(aggregate_type="order", aggregate_id="dead-then-next", event_type="OrderCreated",
                             payload={"blob": "x" * 2_000_000})
    cancelled = enqueue("dead-then-next", "OrderCancelled")

    result = relay_publish_batch()

    assert (result.dead, result.sent, result.held) == (1, 1, 0)
    big.refresh_from_db()
    cancelled.refresh_from_db()
    assert big.status == "dead" and cancelled.status == "sent"
    (record,) = read_topic(broker.bootstrap, TOPIC, start=start, keys={"dead-then-next"}, until=lambda rs: len(rs) >= 1)
    assert record.headers["id"] == str(cancelled.event_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_against_the_broker_a_later_event_is_parked_until_its_blockers_retry_time(broker_outage, settings):
    """A real publish failure (the broker stopped) puts the Created row in backoff; the Cancelled committed
    meanwhile is moved to the same retry time, out of the claims until then, and goes out after it."""
    settings.OUTBOX_BACKOFF_BASE = settings.OUTBOX_BACKOFF_MAX = 30.0  # nothing comes due by itself in this test
    broker_outage.stop()
    created = enqueue("parked-1", "OrderCreated")
    assert relay_publish_batch().retried == 1
    broker_outage.start()
    start = high_watermarks(broker_outage.bootstrap, TOPIC)
    cancelled = enqueue("parked-1", "OrderCancelled")
    other = enqueue("parked-2", "OrderCreated")

    result = relay_publish_batch()

    assert (result.sent, result.held) == (1, 1)
    created.refresh_from_db()
    cancelled.refresh_from_db()
    assert cancelled.status == "pending" and cancelled.attempts == 0
    assert cancelled.available_at == created.available_at > timezone.now()  # parked until the blocker's retry
    assert relay_publish_batch().claimed == 0  # neither is claimed before that time
    assert OutboxEvent.objects.get(pk=other.pk).status == "sent"

    make_due()  # the retry time has come
    relay_until(lambda: not OutboxEvent.objects.filter(status="pending").exists(), timeout=30, message="drained")
    records = read_topic(broker_outage.bootstrap, TOPIC, start=start, keys={"parked-1"},
                         until=lambda rs: {r.headers["eventType"] for r in rs} == {"OrderCreated", "OrderCancelled"})
    first_seen = dict.fromkeys((r.headers["id"], r.headers["eventType"]) for r in records)
    assert [event_type for _, event_type in first_seen] == ["OrderCreated", "OrderCancelled"]
