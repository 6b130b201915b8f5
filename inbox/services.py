"""Apply each event once per consumer group: the dedupe record and the handler's writes commit together."""

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from ops.db import delete_in_batches

from .models import ConsumerDeadLetter, ProcessedEvent
from .registry import handler_for

logger = logging.getLogger(__name__)


class PoisonMessage(Exception):
    """A message no retry can fix: it goes to the DLQ at once."""


@dataclass(frozen=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def text_headers(self) -> dict[str, str]:
        return {name: (value or b"").decode("utf-8", errors="replace") for name, value in self.headers}


@dataclass(frozen=True)
class InboundEvent:
    event_id: str
    event_type: str
    payload: dict
    headers: dict[str, str]


def inbound_event_parse(raw: RawMessage) -> InboundEvent:
    headers = raw.text_headers()
    event_id, event_type = headers.get("id", "").strip(), headers.get("eventType", "").strip()
    if not event_id:
        raise PoisonMessage("missing 'id' header")
    try:
        # One spelling per UUID: the relay sends it with dashes, a CDC connector on MySQL without.
        event_id = str(uuid.UUID(event_id))
    except ValueError:
        pass  # not a UUID: dedupe on the id as sent
    if len(event_id) > 64:
        raise PoisonMessage("'id' header longer than 64 characters")
    if not event_type:
        raise PoisonMessage("missing 'eventType' header")
    if handler_for(event_type) is None:
        raise PoisonMessage(f"no handler for event type {event_type!r}")
    try:
        payload = json.loads(raw.value or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"value is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PoisonMessage("value is not a JSON object")
    return InboundEvent(event_id=event_id, event_type=event_type, payload=payload, headers=headers)


def inbound_event_apply(*, group_id: str, event: InboundEvent, raw: RawMessage) -> bool:
    """Apply the event unless this group already has. Returns False for a duplicate."""
    with transaction.atomic():
        try:
            with transaction.atomic():
                ProcessedEvent.objects.create(
                    group_id=group_id, event_id=event.event_id, event_type=event.event_type,
                    topic=raw.topic, partition=raw.partition, offset=raw.offset,
                )
        except IntegrityError:
            return False
        handler_for(event.event_type)(event.payload, event.headers)
    return True


def dead_letter_record(*, group_id: str, raw: RawMessage, error: str, attempts: int, dlq_topic: str) -> ConsumerDeadLetter:
    record, _ = ConsumerDeadLetter.objects.get_or_create(
        group_id=group_id, topic=raw.topic, partition=raw.partition, offset=raw.offset,
        defaults={
            "key": (raw.key or b"").decode("utf-8", errors="replace"),
            "value": (raw.value or b"").decode("utf-8", errors="replace"),
            "headers": raw.text_headers(),
            "event_id": raw.text_headers().get("id", "")[:64],
            "error": error,
            "attempts": attempts,
            "dlq_topic": dlq_topic,
        },
    )
    return record


def processed_events_purge(*, older_than: timedelta | None = None, batch_size: int = 1000) -> int:
    """Forget processed-event ids older than INBOX_RETENTION_DAYS, in small committed batches.

    Keep the window longer than any redelivery can take (topic retention, consumer lag, DLQ replays):
    an id forgotten too early lets a late duplicate apply twice.
    """
    older_than = older_than if older_than is not None else timedelta(days=settings.INBOX_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_batches(ProcessedEvent.objects.filter(processed_at__lt=cutoff), batch_size=batch_size)
