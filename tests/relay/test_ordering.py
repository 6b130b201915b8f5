"""Relay bookkeeping with a scripted producer (unit level), and per-order order against the real broker."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from outbox.models import FailedEvent, OutboxEvent
from outbox.services import outbox_enqueue
from relay import kafka, services
from relay.services import backoff_delay, relay_publish_batch
from tests.kafka_tools import high_watermarks, read_topic, wait_for
from tests.relay.test_failures import ORDER, TOPIC, relay_until

RETRIABLE = kafka.Delivery(error="_TRANSPORT: broker down", retriable=True)
TOO_LARGE = kafka.Delivery(error="MSG_SIZE_TOO_LARGE: too big", retriable=False)


class ScriptedProducer:
    """Answers each event message by (aggregate id, event type): an error from `failing`, an ack otherwise.
    DLQ messages are always acknowledged."""

    def __init__(self):
        self.failing: dict[tuple[str, str], kafka.Delivery] = {}
        self.published: list[kafka.Message] = []

    def __call__(self, messages, *, timeout):
        self.published.extend(messages)
        ack = kafka.Delivery(partition=0, offset=len(self.published))
        return [ack if m.topic != TOPIC else self.failing.get(self._name(m), ack) for m in messages]

    @staticmethod
    def _name(message):
        return message.key.decode(), dict(message.headers)["eventType"].decode()

    def events(self, topic=TOPIC):
        return [self._name(m) for m in self.published if m.topic == topic]


@pytest.fixture
def producer(monkeypatch):
    scripted = ScriptedProducer()
    monkeypatch.setattr(services.kafka, "publish", scripted)
    return scripted


def enqueue(aggregate_id: str, event_type: str) -> OutboxEvent:
    with transaction.atomic():
        return outbox_enqueue(aggregate_type="order", aggregate_id=aggregate_id, event_type=event_type,
                              payload={"order_id": aggregate_id})


def make_due():
    OutboxEvent.objects.filter(status="pending").update(available_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
class TestBookkeeping:
    def test_later_event_waits_behind_one_in_backoff_and_others_flow(self, producer):
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
        relay_publish_batch()
        assert producer.events()[-2:] == [("1", "OrderCreated"), ("1", "OrderCancelled")]
        assert set(OutboxEvent.objects.values_list("status", flat=True)) == {"sent"}

    def test_a_later_event_waits_while_an_earlier_one_is_in_another_lanes_batch(self):
        created, cancelled = enqueue("5", "OrderCreated"), enqueue("5", "OrderCancelled")
        other = enqueue("6", "OrderCreated")
        with transaction.atomic():
            now = timezone.now()
            rows = {row.id: row for row in services._claim(now=now, batch_size=10)}
            # Another lane of this process holds the Created row: known in memory, no table look-up needed.
            ready, held = services._split_by_aggregate_order(
                [rows[cancelled.id], rows[other.id]], other_lanes=[rows[created.id]], now=now)
            assert [r.id for r in ready] == [other.id] and [r.id for r in held] == [cancelled.id]
            # The same without the lane's word for it: the table says the Created row is still pending.
            ready, held = services._split_by_aggregate_order(
                [rows[cancelled.id], rows[other.id]], other_lanes=[], now=now)
            assert [r.id for r in ready] == [other.id] and [r.id for r in held] == [cancelled.id]
        cancelled.refresh_from_db()
        assert cancelled.available_at <= timezone.now()  # held for the next claim, not parked

    def test_non_retriable_error_dead_letters_at_once_then_later_events_proceed(self, producer):
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

    def test_retriable_errors_back_off_then_exhaust_at_max_attempts(self, producer, settings):
        settings.OUTBOX_MAX_ATTEMPTS = 3
        producer.failing["1", "OrderCreated"] = RETRIABLE
        event = enqueue("1", "OrderCreated")
        delays = []
        for expected_attempts in (1, 2):
            before = timezone.now()
            assert relay_publish_batch().retried == 1
            event.refresh_from_db()
            assert event.attempts == expected_attempts and event.status == "pending"
            delays.append((event.available_at - before).total_seconds())
            make_due()
        assert relay_publish_batch().dead == 1
        event.refresh_from_db()
        assert event.status == "dead" and event.attempts == 3
        assert FailedEvent.objects.get().attempts == 3
        assert 0.5 * settings.OUTBOX_BACKOFF_BASE <= delays[0] <= settings.OUTBOX_BACKOFF_BASE + 0.5

    def test_rows_in_backoff_are_not_claimed(self, producer):
        producer.failing["1", "OrderCreated"] = RETRIABLE
        enqueue("1", "OrderCreated")
        relay_publish_batch()
        assert relay_publish_batch().claimed == 0


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.OUTBOX_BACKOFF_BASE, settings.OUTBOX_BACKOFF_MAX = 1.0, 60.0
    for attempts, full in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)]:
        samples = [backoff_delay(attempts) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples)
        assert max(samples) - min(samples) > 0  # jittered


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_created_reaches_kafka_before_cancelled_when_its_first_attempt_failed(api, broker_outage, settings):
    settings.OUTBOX_BACKOFF_BASE = settings.OUTBOX_BACKOFF_MAX = 3.0
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

    relay_until(lambda: not OutboxEvent.objects.filter(status="pending").exists(), timeout=30, message="drained")
    both = {"OrderCreated", "OrderCancelled"}
    records = read_topic(broker_outage.bootstrap, TOPIC, start=start, keys={str(held_order)},
                         until=lambda rs: {r.headers["eventType"] for r in rs} == both)
    first_seen = dict.fromkeys((r.headers["id"], r.headers["eventType"]) for r in records)  # a late duplicate is no reorder
    assert [event_type for _, event_type in first_seen] == ["OrderCreated", "OrderCancelled"]


@pytest.mark.django_db
def test_a_batch_chosen_as_deadlock_victim_runs_again(producer, monkeypatch):
    from django.db import OperationalError

    enqueue("1", "OrderCreated")
    real_claim = services._claim
    calls = []

    def claim_losing_a_deadlock_once(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")
        return real_claim(**kwargs)

    monkeypatch.setattr(services, "_claim", claim_losing_a_deadlock_once)
    assert services.relay_run(budget=1).sent == 1
    assert len(calls) == 2
    assert OutboxEvent.objects.get().status == "sent"


@pytest.mark.django_db(transaction=True)
def test_a_lane_claims_around_another_lanes_batch_and_holds_what_waits_on_it():
    """Two lanes of one process: the second claims past the first's batch and knows that batch's rows."""
    import threading

    from django.db import connection

    first_created = enqueue("L-1", "OrderCreated")
    second_created = enqueue("L-2", "OrderCreated")
    later_cancel = enqueue("L-1", "OrderCancelled")
    claimed, second = threading.Event(), {}

    def lane_two():
        try:
            claimed.wait(10)
            with services._in_flight.claiming() as claim, transaction.atomic():
                rows, other_lanes = claim(now=timezone.now(), batch_size=10)
                second["rows"], second["other_lanes"] = [r.id for r in rows], [r.id for r in other_lanes]
                ready, held = services._split_by_aggregate_order(rows, other_lanes=other_lanes, now=timezone.now())
                second["held"] = [r.id for r in held]
        finally:
            connection.close()

    thread = threading.Thread(target=lane_two)
    thread.start()
    with services._in_flight.claiming() as claim, transaction.atomic():
        rows, other_lanes = claim(now=timezone.now(), batch_size=2)  # Created L-1, Created L-2
        assert other_lanes == []
        claimed.set()
        thread.join(20)
    assert [r.id for r in rows] == [first_created.id, second_created.id]
    assert second["other_lanes"] == [r.id for r in rows]
    assert second["rows"] == [later_cancel.id]
    assert second["held"] == [later_cancel.id]  # its order's Created is in the other lane's batch
