from datetime import timedelta

import pytest
from django.utils import timezone

from outbox.models import FailedEvent, OutboxEvent
from outbox.services import outbox_purge_sent

pytestmark = pytest.mark.django_db


def event(status, age_hours, **extra):
    published = timezone.now() - timedelta(hours=age_hours) if status == "sent" else None
    return OutboxEvent.objects.create(aggregate_type="order", aggregate_id="1", event_type="OrderCreated",
                                      payload={}, status=status, published_at=published, **extra)


def test_purge_removes_only_old_sent_rows_in_batches(settings):
    settings.OUTBOX_RETENTION_HOURS = 24
    old_sent = [event("sent", 48) for _ in range(5)]
    keep = [event("sent", 1), event("pending", 0), event("dead", 0)]
    old_pending = OutboxEvent.objects.create(aggregate_type="order", aggregate_id="2", event_type="OrderCreated",
                                             payload={}, occurred_at=timezone.now() - timedelta(days=30))
    requeued_then_sent = event("sent", 48)
    FailedEvent.objects.create(outbox_event=requeued_then_sent, event_id=requeued_then_sent.event_id,
                               aggregate_type="order", aggregate_id="1", event_type="OrderCreated", topic="t",
                               payload={}, headers={}, error="x", attempts=5, status="requeued")

    assert outbox_purge_sent(batch_size=2) == 5

    remaining = set(OutboxEvent.objects.values_list("id", flat=True))
    assert remaining == {e.id for e in keep} | {old_pending.id, requeued_then_sent.id}
    assert not remaining & {e.id for e in old_sent}


def test_with_the_relay_off_old_pending_rows_are_purged_by_when_they_occurred(settings):
    """relay_cdc never marks rows sent; it publishes the binlog's inserts, so an old pending row can go."""
    settings.OUTBOX_RELAY_ENABLED = False
    settings.OUTBOX_RETENTION_HOURS = 24
    day_old = timezone.now() - timedelta(hours=25)
    old_pending = [OutboxEvent.objects.create(aggregate_type="order", aggregate_id="3", event_type="OrderCreated",
                                              payload={}, occurred_at=day_old) for _ in range(3)]
    keep = [event("pending", 0), event("dead", 0)]
    requeued = OutboxEvent.objects.create(aggregate_type="order", aggregate_id="4", event_type="OrderCreated",
                                          payload={}, occurred_at=day_old)
    FailedEvent.objects.create(outbox_event=requeued, event_id=requeued.event_id, aggregate_type="order",
                               aggregate_id="4", event_type="OrderCreated", topic="t", payload={}, headers={},
                               error="x", attempts=1, status="requeued")

    assert outbox_purge_sent(batch_size=2) == len(old_pending)
    assert set(OutboxEvent.objects.values_list("id", flat=True)) == {e.id for e in keep} | {requeued.id}
