"""Claim committed outbox rows, publish them to Kafka, and record what the broker said.

One batch is one database transaction: rows are claimed with SELECT ... FOR UPDATE SKIP LOCKED,
so concurrent relays never take the same row, and are marked only after the broker's ack.
A relay that dies before its commit leaves its rows pending: they are published again (a duplicate),
never lost.
"""

import json
import logging
import random
import threading
import time
from contextlib import contextmanager
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from ops import metrics
from ops.db import db_datetime
from outbox.models import FailedEvent, OutboxEvent

from . import kafka

logger = logging.getLogger(__name__)

WAKE_KEY = "outbox:relay:wake"
RETRIABLE_DB_ERRORS = {1213, 1205}  # deadlock victim, lock wait timeout
LATENCY_SAMPLES = 100
TABLE = OutboxEvent._meta.db_table
# Walked in id order, so a claim reads only the rows it takes. Forced: with few pending rows and the
# extra id conditions, the optimizer was seen choosing another index and a filesort, which under
# FOR UPDATE would lock every pending row it sorts.
CLAIM_INDEX = "outbox_claim_idx"


@dataclass
class Claimed:
    id: int
    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str  # the JSON text as stored: published byte for byte
    occurred_at: datetime  # naive UTC, as the raw cursor returns it
    attempts: int

    @property
    def topic(self) -> str:
        return settings.OUTBOX_TOPIC_PREFIX + self.aggregate_type

    def headers(self) -> dict[str, str]:
        return {
            "id": self.event_id,
            "eventType": self.event_type,
            "aggregateType": self.aggregate_type,
            "aggregateId": self.aggregate_id,
            "occurredAt": self.occurred_at.isoformat() + "+00:00",
        }

    def message(self) -> kafka.Message:
        return kafka.Message(
            topic=self.topic,
            key=self.aggregate_id.encode(),
            value=self.payload.encode(),
            headers=[(name, value.encode()) for name, value in self.headers().items()],
        )


@dataclass
class BatchResult:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead: int = 0
    held: int = 0
    errors: list[str] = field(default_factory=list)


def relay_run(*, budget: float | None = None) -> BatchResult:
    """Publish batches while full batches keep coming, within a time budget.

    With a backlog (the first batch was full), OUTBOX_RELAY_LANES lanes drain side by side, each with its
    own database connection and transaction, sharing the process's producer: one lane's database work
    overlaps another's wait for broker acks.
    """
    budget = settings.OUTBOX_RUN_BUDGET if budget is None else budget
    deadline = time.monotonic() + budget
    first = _publish_batch_surviving_deadlocks()
    if not _keep_going(first, deadline):
        return first
    lanes = max(1, settings.OUTBOX_RELAY_LANES)
    if lanes == 1:
        return _add(first, _drain(deadline))
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="relay-lane") as pool:
        results = list(pool.map(lambda _: _drain_lane(deadline), range(lanes)))
    for result in results:
        first = _add(first, result)
    return first


def _publish_batch_surviving_deadlocks(attempts: int = 5) -> BatchResult:
    """InnoDB may pick a claim or a mark of concurrent relays as a deadlock victim. The transaction is then
    rolled back and its rows are still pending: run the batch again (a rolled-back mark republishes, which
    consumers dedupe)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return relay_publish_batch()
        except OperationalError as exc:
            if exc.args[0] not in RETRIABLE_DB_ERRORS or attempt == attempts:
                raise
            logger.info("relay batch rolled back (%s), running it again", exc.args[1])
            time.sleep(random.uniform(0.005, 0.05) * attempt)


def _keep_going(batch: BatchResult, deadline: float) -> bool:
    return batch.claimed >= settings.OUTBOX_BATCH_SIZE and batch.sent > 0 and time.monotonic() < deadline


def _drain(deadline: float) -> BatchResult:
    total = BatchResult()
    while True:
        batch = _publish_batch_surviving_deadlocks()
        total = _add(total, batch)
        if not _keep_going(batch, deadline):
            return total


def _drain_lane(deadline: float) -> BatchResult:
    try:
        return _drain(deadline)
    finally:
        connection.close()  # the lane's thread-local connection


def _add(a: BatchResult, b: BatchResult) -> BatchResult:
    return BatchResult(
        claimed=a.claimed + b.claimed, sent=a.sent + b.sent, retried=a.retried + b.retried,
        dead=a.dead + b.dead, held=a.held + b.held, errors=sorted(set(a.errors) | set(b.errors)),
    )


def relay_publish_batch(*, batch_size: int | None = None) -> BatchResult:
    batch_size = batch_size or settings.OUTBOX_BATCH_SIZE
    result = BatchResult()
    # The batch stays registered until after the commit: its rows are pending until then.
    with _in_flight.claiming() as claim, transaction.atomic():
        now = timezone.now()
        rows, other_lanes = claim(now=now, batch_size=batch_size)
        result.claimed = len(rows)
        if not rows:
            return result
        ready, held = _split_by_aggregate_order(rows, other_lanes=other_lanes, now=now)
        result.held = len(held)
        deliveries = kafka.publish([row.message() for row in ready], timeout=settings.OUTBOX_PUBLISH_TIMEOUT)
        acked = [(row, d) for row, d in zip(ready, deliveries) if d.ok]
        failed = [(row, d) for row, d in zip(ready, deliveries) if not d.ok]
        _mark_sent(acked, now=timezone.now())
        result.sent = len(acked)
        to_retry = [(r, d) for r, d in failed if d.retriable and r.attempts + 1 < settings.OUTBOX_MAX_ATTEMPTS]
        exhausted = [(r, d) for r, d in failed if not (d.retriable and r.attempts + 1 < settings.OUTBOX_MAX_ATTEMPTS)]
        _schedule_retries(to_retry, now=timezone.now())
        _dead_letter(exhausted)
        result.retried, result.dead = len(to_retry), len(exhausted)
        result.errors = sorted({d.error for _, d in failed})
    if failed:
        logger.warning(
            "relay batch: %d sent, %d retrying, %d dead-lettered; errors: %s",
            result.sent, result.retried, result.dead, "; ".join(result.errors),
            extra={"sent": result.sent, "retrying": result.retried, "dead_lettered": result.dead},
        )
    return result


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


_in_flight = _InFlight()


def claim_sql(*, skip_ranges: list[tuple[int, int]] = ()) -> str:
    """The claim statement; parameters: now, batch size."""
    skip = "".join(f" AND id NOT BETWEEN {low} AND {high}" for low, high in skip_ranges)
    return (
        f"SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload, occurred_at, attempts "
        f"FROM {TABLE} FORCE INDEX ({CLAIM_INDEX}) WHERE status = 'pending' AND available_at <= %s{skip} "
        f"ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    )


def _claim(*, now: datetime, batch_size: int, skip_ranges: list[tuple[int, int]] = ()) -> list[Claimed]:
    with connection.cursor() as cursor:
        cursor.execute(claim_sql(skip_ranges=skip_ranges), [db_datetime(now), batch_size])
        rows = cursor.fetchall()
    return [
        Claimed(
            id=r[0], event_id=_uuid_text(r[1]), aggregate_type=r[2], aggregate_id=r[3], event_type=r[4],
            payload=r[5], occurred_at=r[6], attempts=r[7],
        )
        for r in rows
    ]


def _split_by_aggregate_order(
    rows: list[Claimed], *, other_lanes: list[Claimed], now: datetime
) -> tuple[list[Claimed], list[Claimed]]:
    """Keep per-aggregate order: a row may go only if every earlier pending row of its aggregate goes with it.

    Rows of one aggregate in one batch share a key, hence a partition, and the idempotent producer keeps
    their order: a later one is never acknowledged unless the earlier ones were written, except past an
    earlier one refused for good, which is dead-lettered (then later events proceed, by design).

    An earlier row can be in another lane's batch, in backoff, locked by another relay, or just not
    claimed. Rows held behind a row in backoff are moved to its retry time, so claims stop picking them up
    until then.
    """
    # Earliest pending row of each claimed aggregate that this batch did not claim (usually none), with
    # the time it is due. The table is asked only when it holds other pending rows before this batch's
    # last one; the other lanes' batches are known here.
    first_blocker: dict[tuple[str, str], tuple[int, datetime]] = {}
    if _pending_rows_before(rows, other_lanes):
        first_blocker = _first_blockers_in_table(rows)
    for row in other_lanes:
        key = (row.aggregate_type, row.aggregate_id)
        known = first_blocker.get(key)
        if known is None or row.id < known[0]:
            first_blocker[key] = (row.id, now)  # due now: that lane is publishing it

    blocked_until: dict[int, datetime | None] = {}
    for row in rows:
        blocker = first_blocker.get((row.aggregate_type, row.aggregate_id))
        if blocker is not None and blocker[0] < row.id:
            blocked_until[row.id] = blocker[1] if blocker[1] > now else None

    ready = [row for row in rows if row.id not in blocked_until]
    held = [row for row in rows if row.id in blocked_until]
    by_time: dict[datetime, list[int]] = defaultdict(list)
    for row_id, until in blocked_until.items():
        if until is not None:
            by_time[until].append(row_id)
    for until, ids in by_time.items():
        OutboxEvent.objects.filter(id__in=ids).update(available_at=until)
    return ready, held


def _pending_rows_before(rows: list[Claimed], other_lanes: list[Claimed]) -> bool:
    """Whether a pending row other than these precedes the batch's last row (an index-only look-up)."""
    known = ",".join(str(row.id) for row in (*rows, *other_lanes))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {TABLE} FORCE INDEX ({CLAIM_INDEX}) "
            f"WHERE status = 'pending' AND id < %s AND id NOT IN ({known}) LIMIT 1",
            [rows[-1].id],
        )
        return cursor.fetchone() is not None


def _first_blockers_in_table(rows: list[Claimed]) -> dict[tuple[str, str], tuple[int, datetime]]:
    claimed_ids = {row.id for row in rows}
    max_id = max(claimed_ids)
    ids_by_type: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        ids_by_type[row.aggregate_type].add(row.aggregate_id)
    first_blocker: dict[tuple[str, str], tuple[int, datetime]] = {}
    claimed_list = ",".join(str(i) for i in claimed_ids)
    with connection.cursor() as cursor:
        for aggregate_type, aggregate_ids in ids_by_type.items():
            placeholders = ",".join(["%s"] * len(aggregate_ids))
            cursor.execute(
                f"SELECT aggregate_id, MIN(id) FROM {TABLE} "
                f"WHERE aggregate_type = %s AND aggregate_id IN ({placeholders}) AND id < %s "
                f"AND status = 'pending' AND id NOT IN ({claimed_list}) GROUP BY aggregate_id",
                [aggregate_type, *aggregate_ids, max_id],
            )
            blockers = cursor.fetchall()
            if blockers:
                available = dict(
                    OutboxEvent.objects.filter(id__in=[b[1] for b in blockers]).values_list("id", "available_at")
                )
                for aggregate_id, blocker_id in blockers:
                    first_blocker[(aggregate_type, aggregate_id)] = (blocker_id, available[blocker_id])
    return first_blocker


def _mark_sent(acked: list[tuple[Claimed, kafka.Delivery]], *, now: datetime) -> None:
    if not acked:
        return
    metrics.OUTBOX_PUBLISHED.inc(len(acked))
    naive_now = now.replace(tzinfo=None)
    # A sample of at most LATENCY_SAMPLES rows per batch: each observation costs ~10 us in multiprocess mode.
    for row, _ in acked[:: max(1, len(acked) // LATENCY_SAMPLES)]:
        metrics.OUTBOX_PUBLISH_LATENCY.observe((naive_now - row.occurred_at).total_seconds())
    by_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for row, delivery in acked:
        by_partition[int(delivery.partition)].append((row.id, int(delivery.offset)))
    # One UPDATE per partition: the offset CASE of each stays short (one long CASE costs ~10% of a drain).
    with connection.cursor() as cursor:
        for partition, rows in by_partition.items():
            offsets = " ".join(f"WHEN {row_id} THEN {offset}" for row_id, offset in rows)
            cursor.execute(
                f"UPDATE {TABLE} SET status = 'sent', published_at = %s, attempts = attempts + 1, last_error = '', "
                f"kafka_partition = %s, kafka_offset = CASE id {offsets} END "
                f"WHERE id IN ({','.join(str(row_id) for row_id, _ in rows)})",
                [db_datetime(now), partition],
            )


def backoff_delay(attempts: int) -> float:
    """Exponential backoff with equal jitter: half the delay fixed, half random."""
    delay = min(settings.OUTBOX_BACKOFF_MAX, settings.OUTBOX_BACKOFF_BASE * 2 ** max(attempts - 1, 0))
    return delay / 2 + random.uniform(0, delay / 2)


def _schedule_retries(failed: list[tuple[Claimed, kafka.Delivery]], *, now: datetime) -> None:
    metrics.OUTBOX_RETRIED.inc(len(failed))
    for row, delivery in failed:
        attempts = row.attempts + 1
        delay = backoff_delay(attempts)
        OutboxEvent.objects.filter(id=row.id).update(
            attempts=attempts, available_at=now + timedelta(seconds=delay), last_error=delivery.error
        )
        logger.info("publish failed, retrying in %.1fs: %s", delay, delivery.error, extra=_context(row, attempts))


def _dead_letter(exhausted: list[tuple[Claimed, kafka.Delivery]]) -> None:
    """Move exhausted rows out of the pending set, into the DLQ topic and the failed-events table."""
    if not exhausted:
        return
    failed_at = timezone.now()
    records = []
    metrics.OUTBOX_DEAD_LETTERED.inc(len(exhausted))
    for row, delivery in exhausted:
        logger.error("event exhausted after %d attempt(s), dead-lettering: %s", row.attempts + 1, delivery.error,
                     extra=_context(row, row.attempts + 1))
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
        key=failed.aggregate_id.encode(),
        # json.dumps' default separators: the bytes the relay published (Django stores the payload that way).
        value=b"" if omit_value else json.dumps(failed.payload).encode(),
        headers=[(k, str(v).encode()) for k, v in headers.items()],
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
        record.dlq_attempts += 1
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
                record.dlq_next_attempt_at = now + timedelta(seconds=settings.OUTBOX_DLQ_RETRY_INTERVAL)
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


def _context(row: Claimed, attempt: int) -> dict:
    return {"event_id": row.event_id, "order_id": row.aggregate_id, "event_type": row.event_type, "attempt": attempt}


def relay_wake() -> None:
    """Called after a commit that wrote events: queue a relay run unless one is queued or following.

    The flag says "a relay will claim after your commit": a queued run, or a run that keeps following new
    commits (relay_follow). Its TTL and the task's expiry keep runs from piling up while no worker is up.
    """
    from .tasks import relay_outbox

    try:
        if _redis().set(WAKE_KEY, "1", nx=True, px=int(settings.OUTBOX_WAKE_EXPIRES * 1000)):
            relay_outbox.apply_async(kwargs={"woken": True}, expires=settings.OUTBOX_WAKE_EXPIRES)
    except Exception:
        # The commit is done; beat's poll picks the event up within OUTBOX_POLL_INTERVAL.
        logger.warning("could not wake the relay; the next poll will publish", exc_info=True)


def relay_follow() -> BatchResult:
    """The woken relay run: publish, then keep claiming every OUTBOX_WAKE_LINGER seconds while commits keep
    coming, holding the wake flag so that those commits queue no further runs (under load, one run serves
    many commits and claims several events at a time instead of one task per commit).

    After a claim that finds nothing it releases the flag and claims once more: a commit that saw the flag
    still held queued nothing, and that last claim publishes it.
    """
    deadline = time.monotonic() + settings.OUTBOX_RUN_BUDGET
    total = BatchResult()
    _wake_flag_hold()
    try:
        while True:
            batch = relay_run(budget=max(0.0, deadline - time.monotonic()))
            total = _add(total, batch)
            if batch.sent == 0 or time.monotonic() >= deadline:
                break
            time.sleep(settings.OUTBOX_WAKE_LINGER)
    finally:
        relay_wake_clear()  # also when a run failed: the next commit wakes a new run
    return _add(total, relay_run(budget=max(0.0, deadline - time.monotonic())))


def _wake_flag_hold() -> None:
    # For longer than the following can take (its budget, then one batch's publish timeout), so the flag
    # cannot lapse mid-run and let commits queue a second following run; a killed worker's flag lapses
    # after that (beat's poll publishes meanwhile).
    ttl = settings.OUTBOX_WAKE_EXPIRES + settings.OUTBOX_RUN_BUDGET + settings.OUTBOX_PUBLISH_TIMEOUT
    try:
        _redis().set(WAKE_KEY, "1", px=int(ttl * 1000))
    except Exception:
        logger.warning("could not hold the relay wake flag", exc_info=True)


def relay_wake_clear() -> None:
    try:
        _redis().delete(WAKE_KEY)
    except Exception:
        logger.warning("could not clear the relay wake flag", exc_info=True)


_redis_client = None


def _redis() -> redis.Redis:
    global _redis_client
    if _redis_client is None:
        _redis_client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1, socket_connect_timeout=1)
    return _redis_client


def _uuid_text(value) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    if len(text) == 32:
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    return text
