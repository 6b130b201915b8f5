"""Retriable failures: backoff with jitter, rows out of the claims while in backoff, exhaustion at the limit,
and a broker that is really down."""

from datetime import timedelta

import pytest
from django.utils import timezone

from outbox.models import FailedEvent, OutboxEvent
from relay.retries import backoff_delay
from relay.services import relay_publish_batch
from tests.kafka_tools import read_topic, wait_for
from tests.relay.helpers import ORDER, PRODUCER_FAILED, RETRIABLE, TOPIC, enqueue, make_due, relay_until


@pytest.mark.django_db
def test_retriable_errors_back_off_then_exhaust_at_max_attempts_once_failing_for_long_enough(producer, settings):
    settings.OUTBOX_MAX_ATTEMPTS = 3
    settings.OUTBOX_GIVE_UP_AFTER = 0  # attempts alone
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


@pytest.mark.django_db
def test_retriable_failures_never_exhaust_an_event_before_it_has_failed_for_give_up_after(producer, settings):
    """An outage is not the event's fault: past OUTBOX_MAX_ATTEMPTS it keeps retrying (backoff capped) until it
    has been failing for OUTBOX_GIVE_UP_AFTER; then it is given up."""
    settings.OUTBOX_MAX_ATTEMPTS, settings.OUTBOX_GIVE_UP_AFTER = 2, 3600
    producer.failing["1", "OrderCreated"] = RETRIABLE
    event = enqueue("1", "OrderCreated")
    for expected_attempts in range(1, 8):
        assert relay_publish_batch().retried == 1
        event.refresh_from_db()
        assert (event.status, event.attempts) == ("pending", expected_attempts)
        make_due()
    first_failure = event.failing_since
    assert first_failure is not None
    OutboxEvent.objects.filter(pk=event.pk).update(failing_since=timezone.now() - timedelta(seconds=3599))
    assert relay_publish_batch().retried == 1  # not yet
    make_due()
    OutboxEvent.objects.filter(pk=event.pk).update(failing_since=timezone.now() - timedelta(seconds=3601))
    assert relay_publish_batch().dead == 1
    event.refresh_from_db()
    assert event.status == "dead" and FailedEvent.objects.get().attempts == 9


@pytest.mark.django_db
def test_producer_failures_cost_no_attempt_and_keep_the_event_pending(producer, settings):
    settings.OUTBOX_MAX_ATTEMPTS, settings.OUTBOX_GIVE_UP_AFTER = 1, 0
    producer.failing["1", "OrderCreated"] = PRODUCER_FAILED
    event = enqueue("1", "OrderCreated")
    for _ in range(3):
        assert relay_publish_batch().retried == 1
        event.refresh_from_db()
        assert (event.status, event.attempts) == ("pending", 0) and event.failing_since is not None
        make_due()
    del producer.failing["1", "OrderCreated"]
    assert relay_publish_batch().sent == 1
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("sent", 1)


@pytest.mark.django_db
def test_rows_in_backoff_are_not_claimed(producer):
    producer.failing["1", "OrderCreated"] = RETRIABLE
    enqueue("1", "OrderCreated")
    relay_publish_batch()
    assert relay_publish_batch().claimed == 0


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.OUTBOX_BACKOFF_BASE, settings.OUTBOX_BACKOFF_MAX = 1.0, 60.0
    for attempts, full in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0), (5000, 60.0)]:
        samples = [backoff_delay(attempts) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples)
        assert max(samples) - min(samples) > 0  # jittered


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_broker_down_keeps_rows_pending_with_backoff_then_delivers_all(api, broker_outage):
    broker_outage.stop()
    order_ids = [api.post("/api/orders/", ORDER, format="json").json()["id"] for _ in range(3)]

    first = relay_publish_batch()
    assert (first.claimed, first.sent, first.retried, first.dead) == (3, 0, 3, 0)
    rows = list(OutboxEvent.objects.all())
    assert all(r.status == "pending" and r.attempts == 1 and r.last_error for r in rows)
    before = {r.pk: r.available_at for r in rows}
    assert all(r.available_at > r.occurred_at for r in rows)

    wait_for(lambda: relay_publish_batch() and not OutboxEvent.objects.filter(attempts__lt=2).exists(),
             timeout=20, message="a second failed attempt of every row")
    rows = list(OutboxEvent.objects.all())
    assert all(r.status == "pending" and r.attempts >= 2 and r.available_at > before[r.pk] for r in rows)
    assert not OutboxEvent.objects.filter(status="sent").exists()

    broker_outage.start()
    relay_until(lambda: OutboxEvent.objects.filter(status="sent").count() == 3, timeout=30, message="all sent")

    keys = {str(i) for i in order_ids}
    records = read_topic(broker_outage.bootstrap, TOPIC, keys=keys, until=lambda rs: {r.key for r in rs} == keys)
    assert {r.headers["id"] for r in records} == {str(r.event_id) for r in OutboxEvent.objects.all()}
    assert not FailedEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_against_a_stopped_broker_an_event_is_dead_lettered_after_its_attempts(broker_outage, settings):
    """Real retriable failures (delivery timeouts against a stopped broker), not scripted ones, until
    OUTBOX_MAX_ATTEMPTS: then the event is dead and kept in the failed-events table (its DLQ copy pending, the
    broker being down)."""
    settings.OUTBOX_MAX_ATTEMPTS, settings.OUTBOX_GIVE_UP_AFTER = 2, 0
    broker_outage.stop()
    event = enqueue("exhausted-1", "OrderCreated")
    assert relay_publish_batch().retried == 1
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("pending", 1) and event.last_error
    make_due()
    assert relay_publish_batch().dead == 1
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("dead", 2)
    failed = FailedEvent.objects.get(event_id=event.event_id)
    assert failed.attempts == 2 and failed.status == FailedEvent.Status.DLQ_PENDING
