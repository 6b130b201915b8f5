import json
import logging
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from ops import tracing
from ops.db import db_datetime, delete_in_batches
from ops.metrics import OUTBOX_REQUEUED

from .hooks import schedule_after_commit
from .models import NOT_PUBLISHED, FailedEvent, OutboxEvent

logger = logging.getLogger(__name__)


class OutboxError(Exception):
    pass


def outbox_enqueue(*, aggregate_type: str, aggregate_id: str, event_type: str, payload: dict[str, Any]) -> OutboxEvent:
    """Record an event inside the caller's transaction; it is published only if that transaction commits."""
    if not connection.in_atomic_block:
        raise OutboxError("outbox_enqueue must run inside the transaction that makes the change")
    now = timezone.now()
    event = OutboxEvent(
        event_id=uuid.uuid4(), aggregate_type=aggregate_type, aggregate_id=str(aggregate_id), event_type=event_type,
        # The encoder stores decimals, dates and UUIDs as JSON strings; these bytes are what the relay publishes.
        payload=json.dumps(payload, cls=DjangoJSONEncoder), occurred_at=now, available_at=now,
    )
    # A plain INSERT rather than Model.save(): it runs in every write request, and the ORM's statement
    # building costs more CPU than the rest of the outbox write.
    if tracing.enabled():
        event.trace_parent, event.trace_state = tracing.current_trace_headers()
    at = db_datetime(now)
    with connection.cursor() as cursor:
        cursor.execute(_INSERT, [
            event.event_id.hex, event.aggregate_type, event.aggregate_id, event.event_type, event.payload, at, at,
            event.trace_parent, event.trace_state,
        ])
        event.pk = cursor.lastrowid
    event.payload = json.loads(event.payload)
    event._state.adding, event._state.db = False, connection.alias
    if settings.OUTBOX_WAKE_ON_COMMIT:
        schedule_after_commit()
    return event


_INSERT = (
    f"INSERT INTO {OutboxEvent._meta.db_table} "
    "(event_id, aggregate_type, aggregate_id, event_type, payload, occurred_at, available_at, "
    "status, attempts, last_error, kafka_partition, kafka_offset, trace_parent, trace_state) "
    f"VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending', 0, '', {NOT_PUBLISHED}, {NOT_PUBLISHED}, %s, %s)"
)


class RequeueRefused(OutboxError):
    """A requeue that would publish nothing: the Celery relay is off."""


@transaction.atomic
def failed_event_requeue(*, failed_events, user) -> int:
    """Put failed events back into the outbox with their original event id and key.

    Refused while the Celery relay is off (OUTBOX_RELAY_ENABLED=0): a requeue turns the row back to pending, and
    relay_cdc publishes inserts only, so the event would stay pending, never published, while reported requeued.
    """
    if not settings.OUTBOX_RELAY_ENABLED:
        raise RequeueRefused(
            "the Celery relay is off (OUTBOX_RELAY_ENABLED=0): a requeued row would never be published (relay_cdc "
            "publishes inserted rows only). Turn the relay on to requeue (README 'Switching a running deployment')"
        )
    count = 0
    for failed in failed_events.select_for_update().filter(
        status__in=[FailedEvent.Status.DEAD_LETTERED, FailedEvent.Status.DLQ_PENDING, FailedEvent.Status.FAILED]
    ):
        OutboxEvent.objects.filter(pk=failed.outbox_event_id).update(
            status=OutboxEvent.Status.PENDING,
            attempts=0,
            available_at=timezone.now(),
            failing_since=None,
            last_error="",
        )
        failed.status = FailedEvent.Status.REQUEUED
        failed.requeued_at = timezone.now()
        failed.requeued_by = user
        failed.save(update_fields=["status", "requeued_at", "requeued_by"])
        logger.info("requeued event %s by %s", failed.event_id, user,
                    extra={"event_id": str(failed.event_id), "order_id": failed.aggregate_id})
        count += 1
    if count:
        OUTBOX_REQUEUED.inc(count)
        schedule_after_commit()
    return count


def outbox_purge_sent(*, older_than: timedelta | None = None, batch_size: int | None = None) -> int:
    """Delete sent rows past retention, in small committed batches so the relay is never blocked long.

    With the Celery relay off (OUTBOX_RELAY_ENABLED=0: relay_cdc publishes from the binlog), rows are never marked
    sent: pending rows that occurred before the cutoff go instead. That loses nothing even when relay_cdc lags:
    what it publishes is the binlog's insert, not the row, and it skips deletes.
    """
    older_than = older_than if older_than is not None else timedelta(hours=settings.OUTBOX_RETENTION_HOURS)
    batch_size = batch_size or settings.OUTBOX_PURGE_BATCH_SIZE
    cutoff = timezone.now() - older_than
    if settings.OUTBOX_RELAY_ENABLED:
        old = OutboxEvent.objects.filter(status=OutboxEvent.Status.SENT, published_at__lt=cutoff)
    else:
        # In id order through the claim index: the oldest rows come first, so a batch reads about what it deletes.
        old = OutboxEvent.objects.filter(status=OutboxEvent.Status.PENDING, occurred_at__lt=cutoff).order_by("id")
    old = old.exclude(failures__isnull=False)  # requeued events keep their history
    return delete_in_batches(old, batch_size=batch_size)
