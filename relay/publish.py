"""Publish one batch: claim it, keep per-order order, produce it, and record what the broker said.

One batch is one database transaction: its rows are marked sent only after the broker's ack. A relay that
dies before its commit leaves its rows pending: they are published again (a duplicate), never lost.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from ops import metrics, tracing
from ops.db import db_datetime

from . import kafka
from .claim import TABLE, Claimed, in_flight
from .dead_letters import dead_letter
from .ordering import split_by_aggregate_order
from .retries import given_up, schedule_retries
from .tracing import message_trace_headers, producer_spans, producer_spans_end

logger = logging.getLogger(__name__)

LATENCY_SAMPLES = 100


@dataclass
class BatchResult:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead: int = 0
    held: int = 0
    errors: list[str] = field(default_factory=list)

    def __add__(self, other: "BatchResult") -> "BatchResult":
        return BatchResult(
            claimed=self.claimed + other.claimed, sent=self.sent + other.sent, retried=self.retried + other.retried,
            dead=self.dead + other.dead, held=self.held + other.held,
            errors=sorted(set(self.errors) | set(other.errors)),
        )


def relay_publish_batch(*, batch_size: int | None = None, on_full_claim=None) -> BatchResult:
    """on_full_claim: called once the claim took a whole batch (a backlog), before the batch is published."""
    batch_size = batch_size or settings.OUTBOX_BATCH_SIZE
    result = BatchResult()
    # The batch stays registered until after the commit: its rows are pending until then.
    with in_flight.claiming() as claim, transaction.atomic():
        now = timezone.now()
        rows, other_lanes = claim(now=now, batch_size=batch_size)
        result.claimed = len(rows)
        if not rows:
            return result
        if on_full_claim is not None and len(rows) == batch_size:
            on_full_claim()
        ready, held = split_by_aggregate_order(
            rows, other_lanes=other_lanes, now=now,
            one_per_aggregate=kafka.producer.troubled or any(row.failing_since for row in rows),
        )
        spans = producer_spans(ready) if tracing.enabled() else None
        messages = ([row.message(message_trace_headers(span)) for row, span in zip(ready, spans)]
                    if spans else [row.message() for row in ready])
        deliveries = kafka.publish(messages, timeout=settings.OUTBOX_PUBLISH_TIMEOUT)
        acked, behind, failed = sort_outcomes(ready, deliveries)
        _mark_sent(acked, now=timezone.now())
        result.sent, result.held = len(acked), len(held) + len(behind)
        now = timezone.now()
        exhausted, to_retry = [], []
        for row, delivery in failed:
            (exhausted if given_up(row, delivery, now=now) else to_retry).append((row, delivery))
        schedule_retries(to_retry, now=now)
        dead_letter(exhausted)
        result.retried, result.dead = len(to_retry), len(exhausted)
        if spans:
            producer_spans_end(ready, spans, deliveries, retried={r.id for r, _ in to_retry})
        result.errors = sorted({d.error for _, d in failed})
    if failed:
        logger.warning(
            "relay batch: %d sent, %d retrying, %d dead-lettered; errors: %s",
            result.sent, result.retried, result.dead, "; ".join(result.errors),
            extra={"sent": result.sent, "retrying": result.retried, "dead_lettered": result.dead},
        )
    return result


def sort_outcomes(ready: list[Claimed], deliveries: list[kafka.Delivery]):
    """(acked, behind, failed). Behind: acknowledged, but an earlier event of its order failed retriably in
    this batch. It stays pending, unmarked, and goes again after its predecessor (a duplicate, which consumers
    dedupe), so that the order is never marked further than it got. A predecessor refused for good is
    dead-lettered, and later events proceed (by design)."""
    if all(delivery.error is None for delivery in deliveries):  # the usual batch: one pass, no key built per row
        return list(zip(ready, deliveries)), [], []
    acked, behind, failed = [], [], []
    stalled: set[tuple[str, str]] = set()
    for row, delivery in zip(ready, deliveries):
        key = (row.aggregate_type, row.aggregate_id)
        if delivery.ok:
            (behind if key in stalled else acked).append((row, delivery))
        else:
            failed.append((row, delivery))
            if delivery.retriable:
                stalled.add(key)
    return acked, behind, failed


def _mark_sent(acked: list[tuple[Claimed, kafka.Delivery]], *, now: datetime) -> None:
    if not acked:
        return
    metrics.OUTBOX_PUBLISHED.inc(len(acked))
    naive_now = now.replace(tzinfo=None)
    # A sample of at most LATENCY_SAMPLES rows per batch: each observation costs ~10 us in multiprocess mode.
    for row, _ in acked[:: max(1, len(acked) // LATENCY_SAMPLES)]:
        metrics.OUTBOX_PUBLISH_LATENCY.observe((naive_now - row.occurred_at).total_seconds())
    # One UPDATE for the batch. Each row's partition and offset are read from a fixed-width table of positions
    # passed as one binary string and indexed by id: O(1) per row, where a CASE with a WHEN per row costs
    # O(rows) per row and, split per partition to keep it short, one statement per partition (deployed, that
    # took ~10% of the drain). A gap of more than POSITION_RUN_GAP ids starts another statement, which bounds
    # the string at POSITION_WIDTH * POSITION_RUN_GAP bytes per row.
    with connection.cursor() as cursor:
        for run in _id_runs(acked):
            first = run[0][0].id
            positions = [EMPTY_POSITION] * (run[-1][0].id - first + 1)
            for row, delivery in run:
                positions[row.id - first] = POSITION.format(delivery.partition, delivery.offset)
            table = "".join(positions)
            cursor.execute(
                f"UPDATE {TABLE} SET status = 'sent', published_at = %s, attempts = attempts + 1, last_error = '', "
                f"kafka_partition = SUBSTRING(_binary %s, (id - {first}) * {POSITION_WIDTH} + 1, {PARTITION_DIGITS}), "
                f"kafka_offset = SUBSTRING(_binary %s, (id - {first}) * {POSITION_WIDTH} + {PARTITION_DIGITS + 1}, "
                f"{OFFSET_DIGITS}) "
                f"WHERE id IN ({','.join(str(row.id) for row, _ in run)})",
                [db_datetime(now), table, table],
            )


# Any int32 partition and any int64 offset, sign included: a value wider than its field would shift every
# later position of the run.
PARTITION_DIGITS, OFFSET_DIGITS = 11, 20
POSITION_WIDTH = PARTITION_DIGITS + OFFSET_DIGITS
POSITION = f"{{:0{PARTITION_DIGITS}d}}{{:0{OFFSET_DIGITS}d}}"
EMPTY_POSITION = "0" * POSITION_WIDTH  # ids in a run that are not this batch's: never read
POSITION_RUN_GAP = 16


def _id_runs(acked: list[tuple[Claimed, kafka.Delivery]]) -> list[list[tuple[Claimed, kafka.Delivery]]]:
    """The acknowledged rows in id order, split where ids are more than POSITION_RUN_GAP apart."""
    ordered = sorted(acked, key=lambda pair: pair[0].id)
    runs = [[ordered[0]]]
    for pair in ordered[1:]:
        if pair[0].id - runs[-1][-1][0].id > POSITION_RUN_GAP:
            runs.append([])
        runs[-1].append(pair)
    return runs
