"""Apply each event once per consumer group: the dedupe record and the handler's writes commit together."""

import re

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ops.db import db_datetime, duplicate_key, sql_literals

from .messages import InboundEvent, RawMessage
from .models import ProcessedEvent
from .registry import handler_for


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
