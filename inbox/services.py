"""Apply each event once per consumer group: the dedupe record and the handler's writes commit together."""

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from ops.db import db_datetime, delete_in_batches

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


def _canonical_id(event_id: str) -> str:
    """One spelling per UUID: the relay sends it with dashes, a CDC connector on MySQL without."""
    if len(event_id) == 36 and event_id.islower() and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-":
        return event_id  # already canonical (the usual case; parsing it costs a tenth of the whole parse)
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return event_id  # not a UUID: dedupe on the id as sent


def inbound_event_parse(raw: RawMessage) -> InboundEvent:
    headers = raw.text_headers()
    event_id, event_type = headers.get("id", "").strip(), headers.get("eventType", "").strip()
    if not event_id:
        raise PoisonMessage("missing 'id' header")
    event_id = _canonical_id(event_id)
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


def inbound_events_apply(
    *, group_id: str, batch: list[tuple[InboundEvent, RawMessage]]
) -> list[tuple[InboundEvent, RawMessage]]:
    """Apply, in one transaction, the events of `batch` (in offset order) that this group has not applied yet.

    The ids already recorded are found in one query and the new ones recorded in one multi-row insert; an id
    seen twice in the batch is applied once. Returns the duplicates that were skipped. A consumer of the same
    group recording one of these ids meanwhile (a rebalance) makes the insert fail and the whole batch roll
    back: run it again and that id is a duplicate.
    """
    with transaction.atomic():
        recorded = _recorded_ids(group_id, {event.event_id for event, _ in batch})
        now = db_datetime(timezone.now())
        rows, duplicates, fresh = [], [], []
        for event, raw in batch:
            if event.event_id in recorded:
                duplicates.append((event, raw))
                continue
            recorded.add(event.event_id)
            fresh.append(event)
            rows.append((group_id, event.event_id, event.event_type, raw.topic, raw.partition, raw.offset, now))
        if rows:
            _record_processed(rows)
        _run_handlers(fresh)
    return duplicates


_PROCESSED_TABLE = connection.ops.quote_name(ProcessedEvent._meta.db_table)
_PROCESSED_COLUMNS = ", ".join(
    connection.ops.quote_name(ProcessedEvent._meta.get_field(name).column)
    for name in ("group_id", "event_id", "event_type", "topic", "partition", "offset", "processed_at")
)


# Plain SQL for the two statements every batch runs: building them through the ORM (bulk_create, a 500-value
# IN lookup) cost more CPU than the database's work.
def _recorded_ids(group_id: str, event_ids: set[str]) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT event_id FROM {_PROCESSED_TABLE} WHERE group_id = %s "
            f"AND event_id IN ({', '.join(['%s'] * len(event_ids))})",
            [group_id, *event_ids],
        )
        return {row[0] for row in cursor.fetchall()}


def _record_processed(rows: list[tuple]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_PROCESSED_TABLE} ({_PROCESSED_COLUMNS}) "
            f"VALUES {', '.join(['(%s, %s, %s, %s, %s, %s, %s)'] * len(rows))}",
            [value for row in rows for value in row],
        )


def _run_handlers(events: list[InboundEvent]) -> None:
    """Per-event handlers one by one; a batch handler gets each run of consecutive events it handles at once."""
    run: list[InboundEvent] = []
    run_handler = None
    for event in events:
        handler = handler_for(event.event_type)
        if run and handler != run_handler:
            run_handler.function(run)
            run = []
        if handler.batch:
            run_handler = handler
            run.append(event)
        else:
            handler.function(event.payload, event.headers)
    if run:
        run_handler.function(run)


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
