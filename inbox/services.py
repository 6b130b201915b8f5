"""Apply each event once per consumer group: the dedupe record and the handler's writes commit together."""

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import orjson
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ops.db import db_datetime, delete_in_batches, duplicate_key, sql_literals
from ops.json_limits import bounded_number

from .models import ConsumerDeadLetter, ProcessedEvent
from .registry import handler_for

logger = logging.getLogger(__name__)


class PoisonMessage(Exception):
    """A message no retry can fix: it goes to the DLQ at once."""


# A NamedTuple, not a frozen dataclass: one per message consumed, at a third of the cost to build.
class RawMessage(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def text_headers(self) -> dict[str, str]:
        return decode_headers(self.headers)


def decode_headers(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    try:
        return {name: value.decode() for name, value in headers}  # the usual case, at a third of the cost
    except (AttributeError, UnicodeDecodeError):  # a header without a value, or not UTF-8
        return {name: (value or b"").decode("utf-8", errors="replace") for name, value in headers}


class InboundEvent:
    """An event as handlers see it. `headers` (text) is decoded when first asked for: a message carries a dozen
    headers (Debezium-style, CloudEvents, trace), and the consumer itself reads only two of them."""

    __slots__ = ("event_id", "event_type", "payload", "_headers", "_raw_headers")

    def __init__(self, event_id: str, event_type: str, payload: dict, headers: dict[str, str] | None = None, *,
                 raw_headers: list[tuple[str, bytes]] = ()):
        self.event_id, self.event_type, self.payload = event_id, event_type, payload
        self._headers, self._raw_headers = headers, raw_headers

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = decode_headers(self._raw_headers)
        return self._headers

    def __repr__(self) -> str:
        return f"InboundEvent({self.event_type} {self.event_id})"


def _canonical_id(event_id: str) -> str:
    """One spelling per UUID: the relay sends it with dashes, a CDC connector on MySQL without."""
    if len(event_id) == 36 and event_id.islower() and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-":
        return event_id  # already canonical (the usual case; parsing it costs a tenth of the whole parse)
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return event_id  # not a UUID: dedupe on the id as sent


def inbound_event_parse(raw: RawMessage) -> InboundEvent:
    # The relay's and the CDC connector's own headers, else CloudEvents' (a producer that sends only those). Of
    # a message's dozen headers these are the only ones the consumer reads: the others are decoded on demand.
    if len(raw.headers) > MAX_HEADERS:
        raise PoisonMessage(f"more than {MAX_HEADERS} headers ({len(raw.headers)})")
    event_id = event_type = ce_id = ce_type = None
    for name, value in raw.headers:
        if name == "id":
            event_id = value
        elif name == "eventType":
            event_type = value
        elif name == "ce_id":
            ce_id = value
        elif name == "ce_type":
            ce_type = value
    event_id = _header_text(event_id) or _header_text(ce_id)
    event_type = _header_text(event_type) or _header_text(ce_type)
    if not event_id:
        raise PoisonMessage("missing 'id' header (or CloudEvents' 'ce_id')")
    event_id = _canonical_id(event_id)
    if len(event_id) > 64:
        raise PoisonMessage("'id' header longer than 64 characters")
    if not event_type:
        raise PoisonMessage("missing 'eventType' header (or CloudEvents' 'ce_type')")
    if handler_for(event_type) is None:
        raise PoisonMessage(f"no handler for event type {event_type!r}")
    payload = _json_object(raw.value)
    return InboundEvent(event_id, event_type, payload, raw_headers=raw.headers)


def _header_text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace").strip() if value else ""


# 19 digits in a row: maybe an integer beyond 64 bits, which orjson would read as a float (it keeps only 17 of
# its digits). Such a document (or one with a long digit string) is left to the standard library.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


# Limits on what a message may carry (README "The consumer"): beyond them it is poison, dead-lettered unread.
MAX_VALUE_BYTES = 512 * 1024
MAX_HEADERS = 64
MAX_NUMBER_DIGITS = 100  # the standard library's reading; orjson reads numbers into 64-bit values anyway
_BOUNDED_INT, _BOUNDED_FLOAT = bounded_number(int, MAX_NUMBER_DIGITS), bounded_number(float, MAX_NUMBER_DIGITS)


def _json_object(value: bytes | None) -> dict:
    value = value or b""
    if len(value) > MAX_VALUE_BYTES:
        raise PoisonMessage(f"value larger than {MAX_VALUE_BYTES} bytes ({len(value)})")
    try:
        # What orjson refuses (NaN, Infinity, nesting beyond 1,024 levels) or may not keep, the standard library
        # decides: a payload means the same whichever parser read it.
        payload = _orjson_or_none(value)
        if payload is None:  # (or the document was null: the standard library says so too)
            payload = json.loads(value.decode(), parse_int=_BOUNDED_INT,
                                 parse_float=_BOUNDED_FLOAT)  # JSON between systems is UTF-8 (RFC 8259)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise PoisonMessage(f"value is not JSON: {exc}") from exc
    except RecursionError:
        raise PoisonMessage("value is not JSON this consumer reads: nested too deeply") from None
    if not isinstance(payload, dict):
        raise PoisonMessage("value is not a JSON object")
    return payload


def _orjson_or_none(value: bytes):
    if _LONG_DIGITS.search(value):
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def inbound_events_apply(
    *, group_id: str, batch: list[tuple[InboundEvent, RawMessage]]
) -> list[tuple[InboundEvent, RawMessage]]:
    """Apply, in one transaction, the events of `batch` (in offset order) that this group has not applied yet.

    An id seen twice in the batch is applied once. The new ids are recorded in one multi-row insert, tried first
    on its own: almost every batch is all new, and then no query looks for duplicates. When the insert hits an
    id already recorded (a redelivery after a crash or a rebalance), it is undone (InnoDB rolls back the failed
    statement, not the transaction: no savepoint is needed, and none is paid for), the ids already recorded are
    found in one query, and only the others are recorded and applied. A consumer of the same group recording
    one of these ids meanwhile makes the insert wait for its commit and then hit that id. Returns the duplicates
    that were skipped.
    """
    with transaction.atomic():
        literal = sql_literals()
        group = literal(group_id)
        ids: dict[str, str] = {}  # event id -> its literal, in batch order
        fresh, duplicates = [], []
        for event, raw in batch:
            if event.event_id in ids:
                duplicates.append((event, raw))
            else:
                ids[event.event_id] = _id_literal(event.event_id, literal)
                fresh.append((event, raw))
        try:
            _record_processed(literal, group, ids, fresh)
        except IntegrityError as exc:
            if not duplicate_key(exc):
                raise
            recorded = _recorded_ids(group, ids)
            duplicates += [(event, raw) for event, raw in fresh if event.event_id in recorded]
            fresh = [(event, raw) for event, raw in fresh if event.event_id not in recorded]
            if fresh:
                _record_processed(literal, group, ids, fresh)
        _run_handlers([event for event, _ in fresh])
    return duplicates


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _id_literal(event_id: str, literal) -> str:
    """An event id as an SQL literal. A canonical UUID (what the relay and _canonical_id produce: hex digits and
    dashes only) needs no escaping; anything else goes through the driver."""
    return f"'{event_id}'" if _CANONICAL_UUID.fullmatch(event_id) else literal(event_id)


_PROCESSED_TABLE = connection.ops.quote_name(ProcessedEvent._meta.db_table)
_PROCESSED_COLUMNS = ", ".join(
    connection.ops.quote_name(ProcessedEvent._meta.get_field(name).column)
    for name in ("group_id", "event_id", "event_type", "topic", "partition", "offset", "processed_at")
)


# Plain SQL for the batch statements: building them through the ORM (bulk_create, a 500-value
# IN lookup), or even passing their values as parameters, cost more CPU than the database's work. Each event id
# is escaped once for both; the batch's constants once per batch.
def _recorded_ids(group: str, id_literals: dict[str, str]) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT event_id FROM {_PROCESSED_TABLE} WHERE group_id = {group} "
            f"AND event_id IN ({', '.join(id_literals.values())})"
        )
        return {row[0] for row in cursor.fetchall()}


def _record_processed(literal, group: str, id_literals: dict[str, str],
                      rows: list[tuple[InboundEvent, RawMessage]]) -> None:
    """id_literals: event id -> its literal, escaped once for this and the look-up."""
    now = literal(db_datetime(timezone.now()))
    literals: dict[str, str] = {}  # a batch has few event types and topics

    def text(value: str) -> str:
        if value not in literals:
            literals[value] = literal(value)
        return literals[value]

    values = ", ".join(
        f"({group}, {id_literals[event.event_id]}, {text(event.event_type)}, {text(raw.topic)}, {int(raw.partition)}, "
        f"{int(raw.offset)}, {now})"
        for event, raw in rows
    )
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {_PROCESSED_TABLE} ({_PROCESSED_COLUMNS}) VALUES {values}")


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


def message_fingerprint(raw: RawMessage) -> str:
    """What tells two messages at the same offset apart (a topic deleted and created again starts at 0 again)."""
    digest = hashlib.sha256()
    for part in (raw.key or b"", raw.value or b"", *(f"{n}\0".encode() + (v or b"") for n, v in raw.headers)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def dead_letter_find(*, group_id: str, raw: RawMessage) -> ConsumerDeadLetter | None:
    return ConsumerDeadLetter.objects.filter(group_id=group_id, topic=raw.topic, partition=raw.partition,
                                             offset=raw.offset, fingerprint=message_fingerprint(raw)).first()


def dead_letter_record(*, group_id: str, raw: RawMessage, error: str, attempts: int, dlq_topic: str) -> ConsumerDeadLetter:
    record, _ = ConsumerDeadLetter.objects.get_or_create(
        group_id=group_id, topic=raw.topic, partition=raw.partition, offset=raw.offset,
        fingerprint=message_fingerprint(raw),
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


@dataclass
class ReplayResult:
    applied: int = 0
    already_applied: int = 0
    failed: int = 0


def dead_letters_replay(*, dead_letters, user) -> ReplayResult:
    """Apply the given consumer dead letters through their handlers, in the same dedupe transaction as normal
    consumption: an event the group has applied since (or before) is skipped, so a replay is safe to repeat.

    Each record keeps who replayed it, when, and the outcome; one that fails again stays a dead letter with the
    new error and one more attempt. Kafka is not touched: the original offsets were committed long ago.
    """
    result = ReplayResult()
    for record in dead_letters.order_by("group_id", "topic", "partition", "offset"):
        raw = RawMessage(
            topic=record.topic, partition=record.partition, offset=record.offset, key=record.key.encode(),
            value=record.value.encode(), headers=[(name, str(value).encode()) for name, value in record.headers.items()],
        )
        try:
            duplicates = inbound_events_apply(group_id=record.group_id, batch=[(inbound_event_parse(raw), raw)])
        except Exception as exc:  # still poison, or the handler still fails
            record.error, record.attempts, record.replay_outcome = f"replay failed: {exc!r}", record.attempts + 1, "failed"
            result.failed += 1
        else:
            record.replay_outcome = "already applied" if duplicates else "applied"
            if duplicates:
                result.already_applied += 1
            else:
                result.applied += 1
        record.replayed_at, record.replayed_by = timezone.now(), user
        record.save(update_fields=["error", "attempts", "replay_outcome", "replayed_at", "replayed_by"])
        logger.info("consumer dead letter %s[%d]@%d replayed by %s: %s", record.topic, record.partition,
                    record.offset, user, record.replay_outcome,
                    extra={"event_id": record.event_id, "group": record.group_id})
    return result


def processed_events_purge(*, older_than: timedelta | None = None, batch_size: int = 1000) -> int:
    """Forget processed-event ids older than INBOX_RETENTION_DAYS, in small committed batches.

    Keep the window longer than any redelivery can take (topic retention, consumer lag, DLQ replays):
    an id forgotten too early lets a late duplicate apply twice.
    """
    older_than = older_than if older_than is not None else timedelta(days=settings.INBOX_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_batches(ProcessedEvent.objects.filter(processed_at__lt=cutoff), batch_size=batch_size)
