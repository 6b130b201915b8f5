"""How a row is claimed: the claim statement, the claimed row, and the batches this process's lanes hold.

A batch is claimed with SELECT ... FOR UPDATE SKIP LOCKED inside the transaction that publishes and marks it,
so concurrent relays never take the same row, and its rows stay locked until that transaction ends.
"""

import threading
from contextlib import contextmanager
from datetime import datetime

from django.conf import settings
from django.db import connection

from ops.db import db_datetime
from outbox.models import OutboxEvent

from . import kafka

TABLE = OutboxEvent._meta.db_table
# Walked in id order, so a claim reads only the rows it takes. Forced: with few pending rows and the
# extra id conditions, the optimizer was seen choosing another index and a filesort, which under
# FOR UPDATE would lock every pending row it sorts.
CLAIM_INDEX = "outbox_claim_idx"
# A claim locks the rows from the first due one on by the primary key, up to this many batches' worth of ids:
# a backlog's rows are contiguous there, and a locking walk of the primary key costs about a third of the same
# walk through the claim index (which locks each row's index entry as well as the row, and reads the row by a
# second lookup). Rows past that span are walked through the claim index.
CLAIM_SPAN_BATCHES = 4
CLAIM_COLUMNS = (
    "id, event_id, aggregate_type, aggregate_id, event_type, payload, CAST(occurred_at AS CHAR), attempts, "
    "trace_parent, trace_state, failing_since"
)
CLOUDEVENTS_SPEC_VERSION = "1.0"


_CE_SPECVERSION = ("ce_specversion", CLOUDEVENTS_SPEC_VERSION)
_CONTENT_TYPE = ("content-type", "application/json")


def rfc3339(occurred_at: datetime | str) -> str:
    """occurredAt and ce_time: RFC 3339 in UTC, as datetime.isoformat() writes it (no fraction when it is zero).
    A str is the column as MariaDB/MySQL print a DATETIME(6): turned by string operations, ~15 times cheaper
    than the cursor's conversion to datetime and back (which was a tenth of the relay's CPU per event)."""
    if isinstance(occurred_at, str):
        text = occurred_at.replace(" ", "T", 1)
        return (text[:-7] if text.endswith(".000000") else text) + "+00:00"
    return occurred_at.replace(tzinfo=None).isoformat() + "+00:00"


class Claimed:
    """A claimed row. A plain class with slots, not a dataclass: one is built per event published."""

    __slots__ = ("id", "event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "time",
                 "attempts", "topic", "source", "trace_parent", "trace_state", "failing_since")

    def __init__(
        self, *, id: int, event_id: str, aggregate_type: str, aggregate_id: str, event_type: str,
        payload: str,  # the JSON text as stored: published byte for byte
        occurred_at: datetime | str,  # naive UTC; or the column's text as the claim reads it (no datetime built)
        attempts: int,
        topic: str = "",  # OUTBOX_TOPIC_PREFIX + aggregate_type; the claim reads the setting once per batch
        source: str = "",  # OUTBOX_CLOUDEVENTS_SOURCE, read once per batch too
        trace_parent: str = "",  # the enqueuing request's W3C Trace Context, sent on as the message's headers
        trace_state: str = "",
        failing_since: datetime | None = None,  # naive UTC: when its current run of retriable failures began
    ):
        self.id, self.event_id, self.attempts = id, event_id, attempts
        self.aggregate_type, self.aggregate_id, self.event_type = aggregate_type, aggregate_id, event_type
        self.payload, self.time = payload, rfc3339(occurred_at)
        self.topic = topic or settings.OUTBOX_TOPIC_PREFIX + aggregate_type
        self.source = source or settings.OUTBOX_CLOUDEVENTS_SOURCE
        self.trace_parent, self.trace_state = trace_parent, trace_state
        self.failing_since = failing_since

    def __repr__(self) -> str:
        return f"Claimed(id={self.id}, event_id={self.event_id!r}, aggregate_id={self.aggregate_id!r})"

    @property
    def occurred_at(self) -> datetime:
        """Naive UTC."""
        return datetime.fromisoformat(self.time).replace(tzinfo=None)

    def header_items(self, trace_headers: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """trace_headers: the relay's producer span's, when tracing is on; else the stored context goes on."""
        headers = [
            ("id", self.event_id),
            ("eventType", self.event_type),
            ("aggregateType", self.aggregate_type),
            ("aggregateId", self.aggregate_id),
            ("occurredAt", self.time),
            # The CloudEvents Kafka binding, binary mode: a consumer built on a CloudEvents SDK reads the message
            # as an event whose data is the value. The headers above stay for everything written against them.
            _CE_SPECVERSION,
            ("ce_id", self.event_id),
            ("ce_type", self.event_type),
            ("ce_source", self.source),
            ("ce_time", self.time),
            ("ce_subject", self.aggregate_id),
            _CONTENT_TYPE,
        ]
        if trace_headers is not None:
            headers += trace_headers
        else:
            if self.trace_parent:
                headers.append(("traceparent", self.trace_parent))
            if self.trace_state:
                headers.append(("tracestate", self.trace_state))
        return headers

    def headers(self) -> dict[str, str]:
        return dict(self.header_items())

    def message(self, trace_headers: list[tuple[str, str]] | None = None) -> kafka.Message:
        # Text as it is: the Kafka client encodes key, value and header values as UTF-8 in C.
        return kafka.Message(self.topic, self.aggregate_id, self.payload, self.header_items(trace_headers))

    def log_context(self, attempt: int) -> dict:
        return {"event_id": self.event_id, "order_id": self.aggregate_id, "event_type": self.event_type,
                "attempt": attempt}


class _InFlight:
    """The batches this process's lanes hold claimed (locked, not yet committed).

    A lane's claim skips the other lanes' id ranges instead of walking their locked rows one by one (SKIP
    LOCKED still visits each), and its ordering check looks at their rows in memory instead of in the
    table. Rows in a skipped range that the other lane did not take are claimed once its batch commits.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._batches: dict[int, list[Claimed]] = {}

    @contextmanager
    def claiming(self):
        """Yields claim(**kwargs) -> (rows, rows the other lanes hold); the batch is registered until exit."""
        me = threading.get_ident()

        def claim(**kwargs) -> tuple[list[Claimed], list[Claimed]]:
            with self._lock:
                other_batches = [batch for thread, batch in self._batches.items() if thread != me]
                rows = _claim(skip_ranges=[(batch[0].id, batch[-1].id) for batch in other_batches], **kwargs)
                if rows:
                    self._batches[me] = rows
            return rows, [row for batch in other_batches for row in batch]

        try:
            yield claim
        finally:
            with self._lock:
                self._batches.pop(me, None)


in_flight = _InFlight()


def _skip(skip_ranges: list[tuple[int, int]]) -> str:
    return "".join(f" AND id NOT BETWEEN {low} AND {high}" for low, high in skip_ranges)


def first_due_sql(*, skip_ranges: list[tuple[int, int]] = ()) -> str:
    """The first due pending row's id, read (not locked) in the claim index; rows in backoff are passed over
    inside the index. Parameters: now."""
    return (f"SELECT id FROM {TABLE} FORCE INDEX ({CLAIM_INDEX}) "
            f"WHERE status = 'pending' AND available_at <= %s{_skip(skip_ranges)} ORDER BY id LIMIT 1")


def claim_range_sql(*, skip_ranges: list[tuple[int, int]] = ()) -> str:
    """The claim of the due pending rows in an id range, by the primary key. Parameters: first id, last id, now,
    batch size."""
    return (f"SELECT {CLAIM_COLUMNS} FROM {TABLE} FORCE INDEX (PRIMARY) "
            f"WHERE id BETWEEN %s AND %s AND status = 'pending' AND available_at <= %s{_skip(skip_ranges)} "
            f"ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED")


def claim_sql(*, skip_ranges: list[tuple[int, int]] = ()) -> str:
    """The claim of the due pending rows after an id, through the claim index. Parameters: now, id, batch size."""
    return (f"SELECT {CLAIM_COLUMNS} FROM {TABLE} FORCE INDEX ({CLAIM_INDEX}) "
            f"WHERE status = 'pending' AND available_at <= %s AND id > %s{_skip(skip_ranges)} "
            f"ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED")


def _claim(*, now: datetime, batch_size: int, skip_ranges: list[tuple[int, int]] = ()) -> list[Claimed]:
    """Up to batch_size due pending rows in id order, locked, skipping rows other transactions hold."""
    now_text = db_datetime(now)
    with connection.cursor() as cursor:
        cursor.execute(first_due_sql(skip_ranges=skip_ranges), [now_text])
        first = cursor.fetchone()
        if first is None:
            return []
        last = first[0] + CLAIM_SPAN_BATCHES * batch_size
        cursor.execute(claim_range_sql(skip_ranges=skip_ranges), [first[0], last, now_text, batch_size])
        rows = list(cursor.fetchall())
        if len(rows) < batch_size:  # few rows in the span, or many held by other relays: on past it
            cursor.execute(claim_sql(skip_ranges=skip_ranges), [now_text, last, batch_size - len(rows)])
            rows += cursor.fetchall()
    prefix, source = settings.OUTBOX_TOPIC_PREFIX, settings.OUTBOX_CLOUDEVENTS_SOURCE
    return [_claimed_from_row(r, prefix, source) for r in rows]


def _claimed_from_row(r: tuple, prefix: str, source: str) -> Claimed:
    """Claimed(...) with its slots set directly: half the cost of the keyword call, paid once per event."""
    row = Claimed.__new__(Claimed)
    row.id, row.event_id, row.aggregate_type, row.aggregate_id, row.event_type = r[0], uuid_text(r[1]), r[2], r[3], r[4]
    row.payload, row.time, row.attempts, row.topic, row.source = r[5], rfc3339(r[6]), r[7], prefix + r[2], source
    row.trace_parent, row.trace_state, row.failing_since = r[8], r[9], r[10]
    return row


def uuid_text(value) -> str:
    """An event id as the messages carry it: dashed (Django keeps 32 hex digits on MySQL, a uuid on MariaDB)."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    if len(text) == 32:
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    return text
