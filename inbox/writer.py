"""The writer thread's part of the consumer: apply one batch in one database transaction, its poison messages
dead-lettered; a batch that fails is applied one event at a time, so that only the failing event is retried
and, after INBOX_MAX_ATTEMPTS, dead-lettered."""

import logging
import time
from collections.abc import Callable

from django.db import OperationalError

from ops import metrics, tracing
from ops.db import lock_conflict

from .apply import inbound_events_apply
from .database import database_unavailable, until_database_answers
from .dead_letters import DeadLetterer, dead_letter_find, log_context
from .messages import InboundEvent, PoisonMessage, RawMessage
from .tracing import consumer_span

logger = logging.getLogger(__name__)

# A batch that lost a lock conflict (another consumer of the group, during a rebalance) runs again as a whole.
LOCK_RETRIES = 3

Parsed = tuple[InboundEvent | PoisonMessage, RawMessage]


class WriterStopped(Exception):
    """An earlier batch failed: later ones are not applied, so a partition's events never apply out of order."""


class BatchWriter:
    def __init__(self, *, group_id: str, dlq_topic: str, max_attempts: int, backoff_base: float,
                 stopping: Callable[[], bool]):
        self.group_id = group_id
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.stats = {"applied": 0, "duplicates": 0, "dead_lettered": 0, "batches": 0, "batch_fallbacks": 0}
        self._stopping = stopping
        self.dead_letters = DeadLetterer(group_id=group_id, dlq_topic=dlq_topic,
                                         until_database_answers=self._until_database_answers)
        self._span = None  # the batch's span, when tracing is on
        self._failed = False

    def write(self, messages: list, parsed: list[Parsed]) -> None:
        """Apply one batch (and dead-letter its poison messages); after a failure, refuse every later batch."""
        if self._failed:
            raise WriterStopped()
        try:
            if not tracing.enabled():
                return self._write_batch(parsed)
            with consumer_span(self.group_id, messages) as self._span:
                try:
                    return self._write_batch(parsed)
                finally:
                    self._span = None
        except BaseException:
            self._failed = True
            raise

    def _write_batch(self, parsed: list[Parsed]) -> None:
        self.stats["batches"] += 1
        batch: list[tuple[InboundEvent, RawMessage]] = []
        for event, raw in parsed:
            if isinstance(event, PoisonMessage):
                self._dead_letter(raw, f"poison message: {event}", attempts=1)
            else:
                batch.append((event, raw))
        if not batch:
            return
        try:
            duplicates = self._apply(batch)
        except Exception as exc:
            if database_unavailable(exc):
                raise  # only while stopping: nothing of the batch is committed, it comes back
            # One message spoiled the batch: apply them one at a time, so that only that one is retried.
            self.stats["batch_fallbacks"] += 1
            logger.warning("a batch of %d events failed (%r); applying them one at a time", len(batch), exc,
                           extra={"group": self.group_id})
            for event, raw in batch:
                self._apply_alone(event, raw)
            return
        self._count(applied=len(batch) - len(duplicates), duplicates=duplicates)

    def _apply(self, batch: list[tuple[InboundEvent, RawMessage]]) -> list[tuple[InboundEvent, RawMessage]]:
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                return self._until_database_answers(lambda: inbound_events_apply(group_id=self.group_id, batch=batch))
            except OperationalError as exc:
                if not lock_conflict(exc) or attempt == LOCK_RETRIES:
                    raise
                logger.info("batch rolled back (%s), running it again", exc.args[1])

    def _apply_alone(self, event: InboundEvent, raw: RawMessage) -> None:
        known = self._until_database_answers(lambda: dead_letter_find(group_id=self.group_id, raw=raw))
        if known is not None:  # dead-lettered before, and redelivered: its retries are not run again
            return self._dead_letter(raw, known.error, known.attempts)
        attempts = 0
        while True:
            attempts += 1
            try:
                duplicates = self._apply([(event, raw)])
                self._count(applied=1 - len(duplicates), duplicates=duplicates)
                return
            except Exception as exc:
                if database_unavailable(exc):
                    raise  # only while stopping: leave the offset uncommitted, the message comes back
                if attempts >= self.max_attempts:
                    return self._dead_letter(raw, f"handler failed: {exc!r}", attempts)
                logger.warning("handler failed for %s[%d]@%d (attempt %d): %r", raw.topic, raw.partition,
                               raw.offset, attempts, exc, extra=log_context(self.group_id, raw, attempts))
                time.sleep(self.backoff_base * 2 ** (attempts - 1))

    def _dead_letter(self, raw: RawMessage, error: str, attempts: int) -> None:
        self.dead_letters.dead_letter(raw, error, attempts, span=self._span)
        self.stats["dead_lettered"] += 1

    def _count(self, *, applied: int, duplicates: list[tuple[InboundEvent, RawMessage]]) -> None:
        self.stats["applied"] += applied
        self.stats["duplicates"] += len(duplicates)
        metrics.INBOX_PROCESSED.labels(self.group_id).inc(applied)
        if duplicates:
            metrics.INBOX_DUPLICATES.labels(self.group_id).inc(len(duplicates))
        for event, raw in duplicates:
            if self._span is not None:
                self._span.add_event("duplicate skipped", {"messaging.message.id": event.event_id})
            logger.info("skipped duplicate event %s (%s)", event.event_id, event.event_type,
                        extra=log_context(self.group_id, raw, 1, event.event_id))

    def _until_database_answers(self, work):
        return until_database_answers(work, stopping=self._stopping)
