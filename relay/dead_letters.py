"""What happens to an exhausted event: it leaves the pending set for the failed-events table and the DLQ topic.

The failed event is recorded before the DLQ publish, so an event the DLQ topic cannot take either is kept
all the same; the sweeper (dead_letters_retry) retries such publishes.
"""

import json
import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ops import metrics
from outbox.models import FailedEvent, OutboxEvent

from . import kafka
from .claim import Claimed

logger = logging.getLogger(__name__)


def dead_letter(exhausted: list[tuple[Claimed, kafka.Delivery]]) -> None:
    """Move exhausted rows out of the pending set, into the DLQ topic and the failed-events table."""
    if not exhausted:
        return
    failed_at = timezone.now()
    records = []
    metrics.OUTBOX_DEAD_LETTERED.inc(len(exhausted))
    for row, delivery in exhausted:
        logger.error("event exhausted after %d attempt(s), dead-lettering: %s", row.attempts + 1, delivery.error,
                     extra=row.log_context(row.attempts + 1))
        OutboxEvent.objects.filter(id=row.id).update(
            status=OutboxEvent.Status.DEAD, attempts=row.attempts + 1, last_error=delivery.error
        )
        records.append(
            FailedEvent(
                outbox_event_id=row.id, event_id=row.event_id, aggregate_type=row.aggregate_type,
                aggregate_id=row.aggregate_id, event_type=row.event_type, topic=row.topic,
                payload=json.loads(row.payload), headers=row.headers(), error=delivery.error,
                attempts=row.attempts + 1, status=FailedEvent.Status.DLQ_PENDING, failed_at=failed_at,
            )
        )
    for record in records:
        record.save()  # one by one: MySQL (unlike MariaDB) returns no ids from a bulk insert
    _publish_dead_letters(records)


def dead_letter_message(failed: FailedEvent, *, omit_value: bool = False) -> kafka.Message:
    headers = {
        **failed.headers,
        "dlq.error": failed.error,
        "dlq.attempts": str(failed.attempts),
        "dlq.originalTopic": failed.topic,
        "dlq.failedAt": failed.failed_at.isoformat(),
    }
    if omit_value:
        headers["dlq.valueOmitted"] = "the payload could not be published; it is kept in the failed-events table"
    return kafka.Message(
        topic=settings.OUTBOX_DLQ_TOPIC,
        key=failed.aggregate_id,
        # json.dumps' default separators: the bytes the relay published (Django stores the payload that way).
        value=b"" if omit_value else json.dumps(failed.payload),  # empty, not null, when omitted
        headers=[(k, str(v)) for k, v in headers.items()],
    )


def _publish_dead_letters(records: list[FailedEvent]) -> None:
    timeout = settings.OUTBOX_PUBLISH_TIMEOUT
    deliveries = kafka.publish([dead_letter_message(r) for r in records], timeout=timeout)
    # A payload the broker refuses for good (too large, most often) still gets its DLQ record: without the value.
    refused = [i for i, d in enumerate(deliveries) if not d.ok and not d.retriable]
    if refused:
        second = kafka.publish([dead_letter_message(records[i], omit_value=True) for i in refused], timeout=timeout)
        for i, delivery in zip(refused, second):
            deliveries[i] = delivery
    now = timezone.now()
    for record, delivery in zip(records, deliveries):
        record.dlq_attempts += 1 if delivery.costs_attempt else 0  # a failure of the producer is not the DLQ's
        if delivery.ok:
            record.status = FailedEvent.Status.DEAD_LETTERED
            record.dlq_error = ""
            record.dlq_next_attempt_at = None
        else:
            record.dlq_error = delivery.error
            if record.dlq_attempts > settings.OUTBOX_DLQ_MAX_RETRIES:
                record.status = FailedEvent.Status.FAILED
                record.dlq_next_attempt_at = None
            else:
                record.status = FailedEvent.Status.DLQ_PENDING
                # After a producer failure, at the sweeper's next run (a rebuilt producer is up by then).
                retry_in = settings.OUTBOX_DLQ_RETRY_INTERVAL if delivery.costs_attempt else 0
                record.dlq_next_attempt_at = now + timedelta(seconds=retry_in)
            logger.critical(
                "event %s (%s %s:%s) is exhausted and could not be written to the DLQ topic %s: %s; "
                "it is kept in the failed-events table (status %s)",
                record.event_id, record.event_type, record.aggregate_type, record.aggregate_id,
                settings.OUTBOX_DLQ_TOPIC, delivery.error, record.status,
                extra={"event_id": str(record.event_id), "order_id": record.aggregate_id,
                       "event_type": record.event_type, "attempt": record.attempts},
            )
    FailedEvent.objects.bulk_update(records, ["status", "dlq_attempts", "dlq_error", "dlq_next_attempt_at"])


def dead_letters_retry() -> int:
    """The sweeper: retry DLQ publishes that failed, until OUTBOX_DLQ_MAX_RETRIES retries have failed."""
    with transaction.atomic():
        records = list(
            FailedEvent.objects.select_for_update(skip_locked=True)
            .filter(status=FailedEvent.Status.DLQ_PENDING, dlq_next_attempt_at__lte=timezone.now())
            .order_by("id")[: settings.OUTBOX_BATCH_SIZE]
        )
        if records:
            _publish_dead_letters(records)
    return len(records)
