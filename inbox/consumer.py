"""The consume loop: take a batch, apply it in one database transaction, then commit its offsets."""

import logging
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection

from ops import metrics, tracing
from ops.db import lock_conflict
from ops.runtime import collect_garbage_for_batches
from relay import kafka as producing  # the product's producer: idempotent, rebuilt after a fatal error

from . import kafka
from .models import ConsumerDeadLetter
from .services import (InboundEvent, PoisonMessage, RawMessage, dead_letter_find, dead_letter_record, inbound_event_parse,
                       inbound_events_apply)
from .tracing import consumer_span

logger = logging.getLogger(__name__)

# A database that is away or busy is not the message's fault: wait for it, never dead-letter because of it.
# Connection lost or refused, the server read-only during a failover (1290, 1836), too many connections (1040),
# a lock wait timeout (1205: someone else holds the rows). Any other error is the message's: it is retried,
# then dead-lettered (a deadlock, 1213, runs the batch again LOCK_RETRIES times first).
TRANSIENT_ERROR_CODES = {1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031, 1290, 1836, 1040, 1205}
# Errors the client reports for one record it could not read (its offset is the record's): poison. Every other
# error message (a fetch error, its offset the next position, not a record) is only logged.
UNREADABLE_RECORD_CODES = frozenset({kafka.KafkaError._BAD_MSG, kafka.KafkaError._BAD_COMPRESSION})
# A batch that lost a lock conflict (another consumer of the group, during a rebalance) runs again as a whole.
LOCK_RETRIES = 3
LAG_REPORT_INTERVAL = 5.0
# While the writer holds a long batch, how often this thread polls (paused) to stay in the group.
POLL_WHILE_WRITING = 0.5
# Batches handed to the writer thread and not yet committed to Kafka: the one it applies, and the next one, parsed
# meanwhile. More would only hold more messages uncommitted.
IN_FLIGHT = 2
# The writer thread spends most of a batch waiting for the database, with the GIL released; when an answer comes,
# it waits for the parsing thread to hand the GIL over, by default after up to 5 ms, several times per batch
# (measured: a third of the writer's rate lost at 5 ms, little at 0.1 ms).
SWITCH_INTERVAL = 0.0001


def tune_process_for_consuming() -> None:
    """Process-wide settings for a process that runs the consumer (consume_events)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    collect_garbage_for_batches()  # each batch allocates thousands of containers, and frees them by refcount


def _wait(future: Future, timeout: float) -> bool:
    try:
        future.exception(timeout=timeout)
        return True
    except TimeoutError:
        return False


class _WriterStopped(Exception):
    """An earlier batch failed: later ones are not applied, so a partition's events never apply out of order."""


def database_unavailable(exc: BaseException) -> bool:
    """A transient database error (TRANSIENT_ERROR_CODES, or the driver's InterfaceError: no connection)."""
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, DatabaseError) and bool(exc.args) and exc.args[0] in TRANSIENT_ERROR_CODES


def _has_record_position(message: kafka.Message) -> bool:
    return bool(message.topic()) and (message.offset() or 0) >= 0


class EventConsumer:
    def __init__(self, *, group_id: str, topics: list[str], dlq_topic: str, max_attempts: int, backoff_base: float,
                 batch_size: int = 500):
        self.group_id = group_id
        self.topics = topics
        self.dlq_topic = dlq_topic
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.batch_size = max(1, batch_size)
        self.stopping = False
        self.stats = {"applied": 0, "duplicates": 0, "dead_lettered": 0, "batches": 0, "batch_fallbacks": 0}
        self._consumer = kafka.build_consumer(group_id=group_id)
        self._dlq_producer = None
        self._rebalanced = False
        self._heartbeat = _Heartbeat(group_id)
        self._span = None  # the batch's span, when tracing is on (the writer thread's)
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: deque[tuple[Future, list[kafka.TopicPartition]]] = deque()
        self._writer_failed = False

    def stop(self, *_args) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> dict:
        """Consume until stopped (or, for tools and tests, after max_messages or idle_timeout seconds idle).

        Two stages: this thread polls Kafka and parses a batch while a writer thread applies the previous one
        in its database transaction; a batch's offsets are committed here, in order, once the writer has
        committed it to the database.
        """
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._heartbeat.start()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox-writer")
        handled = 0
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                limit = self.batch_size if max_messages is None else min(self.batch_size, max_messages - handled)
                messages = self._next_batch(limit)
                self._commit_applied(wait=False)
                if not messages:
                    if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                        break
                    continue
                self._submit(messages)
                handled += len(messages)
                idle_since = time.monotonic()
                if max_messages is not None and handled >= max_messages:
                    break
            for future, _ in list(self._in_flight):
                self._wait_serving_the_group(future)
            self._commit_applied(wait=True)
        finally:
            self.stopping = True  # a writer waiting for the database gives up: its batch is not committed
            self._in_flight.clear()
            self._writer.submit(connection.close)
            self._writer.shutdown(wait=True)
            self._commit_sync()
            self._consumer.close()
            self._heartbeat.stop()
            if self._dlq_producer is not None:
                self._dlq_producer.flush(10)
        return self.stats

    def _submit(self, messages: list[kafka.Message]) -> None:
        """Hand a batch to the writer, parsed here; wait while IN_FLIGHT batches are not yet applied."""
        parsed = [self._parse(message) for message in messages]
        future = self._writer.submit(self._write, messages, parsed)
        self._in_flight.append((future, self._next_offsets(messages)))
        while len(self._in_flight) >= IN_FLIGHT:
            self._wait_serving_the_group(self._in_flight[0][0])  # the oldest
            self._commit_applied(wait=False)

    def _wait_serving_the_group(self, future: Future) -> None:
        """Wait for a batch the writer holds while staying in the group: however long its handlers, retries and
        DLQ publishes take, this thread keeps calling poll() (max.poll.interval.ms), with the partitions paused
        so that nothing new is taken meanwhile (librdkafka fetches them again from the position on resume)."""
        if _wait(future, POLL_WHILE_WRITING):
            return  # the usual case: no pause (it would drop what has been fetched ahead)
        try:
            self._consumer.pause(self._consumer.assignment())
            while not _wait(future, POLL_WHILE_WRITING):
                message = self._consumer.poll(0)
                self._heartbeat.polled()
                if message is not None and _has_record_position(message):
                    # From a partition assigned meanwhile (not paused): read it again after the wait.
                    self._consumer.seek(kafka.TopicPartition(message.topic(), message.partition(), message.offset()))
        except kafka.KafkaException as exc:  # a partition revoked under us: the rebalance reads it again
            logger.info("while the writer held a batch: %s", exc)
        finally:
            try:
                self._consumer.resume(self._consumer.assignment())
            except kafka.KafkaException as exc:  # the assignment moved on: nothing of ours to resume
                logger.info("resume after the writer's batch: %s", exc)
        future.exception()

    def _commit_applied(self, *, wait: bool) -> None:
        """Commit the offsets of the batches the writer has applied, oldest first; with wait, of every batch
        handed to it. A batch that failed raises here: neither it nor any later batch is committed."""
        while self._in_flight and (wait or self._in_flight[0][0].done()):
            future, offsets = self._in_flight[0]
            future.result()
            self._in_flight.popleft()
            # Only now are the batch's effects (or its dead letters) durable: commit past them.
            self._consumer.store_offsets(offsets=offsets)
            self._consumer.commit(asynchronous=True)
            self._heartbeat.applied()

    def _next_batch(self, limit: int) -> list[kafka.Message]:
        """Wait (briefly) for one message, then take whatever else has already arrived, up to limit: a lone
        event is applied at once, a backlog in batches. While the writer holds a batch, the wait is short, so
        that its offsets are committed soon after it is applied."""
        first = self._consumer.poll(0.02 if self._in_flight else 0.5)
        self._heartbeat.polled()
        if first is None:
            return []
        self._rebalanced = False
        messages = [first] + (self._consumer.consume(limit - 1, timeout=0) if limit > 1 else [])
        if self._rebalanced:
            # Partitions were revoked while the batch was taken: what it holds of a partition this consumer no
            # longer owns belongs to the new owner, which reads it again from the committed offset. (Messages of
            # a partition assigned again are kept: a redelivery of them is skipped as duplicates.)
            owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            messages = [m for m in messages if (m.topic(), m.partition()) in owned or (m.error() and m.error().fatal())]
        batch = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.fatal():
                raise kafka.KafkaException(error)
            elif error.code() in UNREADABLE_RECORD_CODES and _has_record_position(message):
                batch.append(message)  # a record the client could not read (a corrupt batch): poison, dead-lettered
            else:
                logger.warning("consumer: %s", error)
        return batch

    @staticmethod
    def _next_offsets(messages: list[kafka.Message]) -> list[kafka.TopicPartition]:
        last: dict[tuple[str, int], int] = {}
        for message in messages:
            key = (message.topic(), message.partition())
            last[key] = max(last.get(key, -1), message.offset())
        return [kafka.TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]

    @staticmethod
    def _parse(message: kafka.Message) -> tuple[InboundEvent | PoisonMessage, RawMessage]:
        """Whatever reading a message raises makes it poison: no message can stop the consumer."""
        try:
            headers, unreadable = message.headers() or [], None
        except Exception:  # a header name that is not UTF-8: the client cannot hand the headers over
            headers, unreadable = [], "headers the client cannot read (a header name that is not UTF-8)"
        raw = RawMessage(topic=message.topic(), partition=message.partition(), offset=message.offset(),
                         key=message.key(), value=message.value(), headers=headers)
        if unreadable:
            return PoisonMessage(unreadable), raw
        if message.error() is not None:
            return PoisonMessage(f"the Kafka client reported the record as an error: {message.error()}"), raw
        try:
            return inbound_event_parse(raw), raw
        except PoisonMessage as exc:
            return exc, raw
        except Exception as exc:
            return PoisonMessage(f"unreadable: {exc!r}"[:1000]), raw

    def _write(self, messages: list[kafka.Message], parsed: list) -> None:
        """The writer thread's part: apply one batch (and dead-letter its poison messages)."""
        if self._writer_failed:
            raise _WriterStopped()
        try:
            if not tracing.enabled():
                return self._write_batch(parsed)
            with consumer_span(self.group_id, messages) as self._span:
                try:
                    return self._write_batch(parsed)
                finally:
                    self._span = None
        except BaseException:
            self._writer_failed = True
            raise

    def _write_batch(self, parsed: list[tuple[InboundEvent | PoisonMessage, RawMessage]]) -> None:
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
                logger.warning("handler failed for %s[%d]@%d (attempt %d): %r",
                               raw.topic, raw.partition, raw.offset, attempts, exc, extra=self._context(raw, attempts))
                time.sleep(self.backoff_base * 2 ** (attempts - 1))

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
                        extra=self._context(raw, 1, event.event_id))

    def _until_database_answers(self, work):
        delay = 0.5
        while True:
            try:
                return work()
            except DatabaseError as exc:
                if not database_unavailable(exc) or self.stopping:
                    close_old_connections()
                    raise
                logger.warning("database unavailable, retrying in %.1fs: %s", delay, exc)
                connection.close()
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _dead_letter(self, raw: RawMessage, error: str, attempts: int) -> None:
        record = self._until_database_answers(
            lambda: dead_letter_record(group_id=self.group_id, raw=raw, error=error, attempts=attempts, dlq_topic=self.dlq_topic)
        )
        self.stats["dead_lettered"] += 1
        if self._span is not None:
            self._span.add_event("dead-lettered", {"messaging.kafka.offset": raw.offset, "exception.message": error,
                                                   "messaging.destination.partition.id": str(raw.partition)})
        metrics.INBOX_DEAD_LETTERED.labels(self.group_id).inc()
        logger.error("dead-lettered %s[%d]@%d after %d attempt(s): %s", raw.topic, raw.partition, raw.offset,
                     attempts, error, extra=self._context(raw, attempts))
        if not record.dlq_published and self._publish_dead_letter(raw, error, attempts):
            self._until_database_answers(
                lambda: ConsumerDeadLetter.objects.filter(pk=record.pk).update(dlq_published=True)
            )

    def _publish_dead_letter(self, raw: RawMessage, error: str, attempts: int) -> bool:
        if self._dlq_producer is None:
            self._dlq_producer = producing.ProducerHolder(config=kafka.dlq_producer_config)
        headers = raw.headers + [
            ("dlq.error", error.encode()),
            ("dlq.attempts", str(attempts).encode()),
            ("dlq.originalTopic", raw.topic.encode()),
            ("dlq.originalPartition", str(raw.partition).encode()),
            ("dlq.originalOffset", str(raw.offset).encode()),
            ("dlq.consumerGroup", self.group_id.encode()),
            ("dlq.failedAt", datetime.now(timezone.utc).isoformat().encode()),
        ]
        message = producing.Message(self.dlq_topic, raw.key, raw.value, headers)
        delivery = producing.publish([message], timeout=15, holder=self._dlq_producer)[0]
        if delivery.ok:
            return True
        # The dead letter is in the database either way; the topic copy is for downstream tooling.
        logger.critical("could not write %s[%d]@%d to DLQ topic %s: %s; it is kept in the database",
                        raw.topic, raw.partition, raw.offset, self.dlq_topic, delivery.error)
        return False

    def _context(self, raw: RawMessage, attempt: int, event_id: str | None = None) -> dict:
        headers = raw.text_headers()
        return {
            "event_id": event_id or headers.get("id", ""), "order_id": headers.get("aggregateId", ""),
            "event_type": headers.get("eventType", ""), "attempt": attempt, "group": self.group_id,
            "topic": raw.topic, "partition": raw.partition, "offset": raw.offset,
        }

    def _on_assign(self, consumer, partitions) -> None:
        self._heartbeat.assigned(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        # The writer finishes the batches it holds, and what they applied is committed before the partitions go;
        # the batch being taken keeps only what this consumer still owns.
        self._rebalanced = True
        self._heartbeat.assigned([])
        try:
            self._commit_applied(wait=True)
        except Exception:
            logger.exception("a batch failed while partitions were revoked; its offsets stay uncommitted")
            self.stopping = True  # the loop stops here: see the error above
        self._commit_sync()

    def _commit_sync(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except kafka.KafkaException as exc:
            if exc.args[0].code() != kafka.KafkaError._NO_OFFSET:
                logger.warning("offset commit failed (messages will be redelivered and deduped): %s", exc)
        except RuntimeError:
            pass  # consumer already closed


class _Heartbeat:
    """What an alert watches, kept up by a thread of its own so that it goes on while the loop is stuck: when the
    consumer last polled and last applied a batch (timestamps, and seconds since, every second), and the lag of
    its partitions (every LAG_REPORT_INTERVAL): the broker's high watermark, asked rather than a cached value that
    goes stale while nothing is fetched, minus the group's committed offset (what is durably applied)."""

    def __init__(self, group_id: str):
        self.group_id = group_id
        self._last_poll = self._last_applied = time.time()
        self._partitions: list = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="inbox-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def polled(self) -> None:
        self._last_poll = time.time()

    def applied(self) -> None:
        self._last_applied = time.time()

    def assigned(self, partitions: list) -> None:
        self._partitions = [kafka.TopicPartition(p.topic, p.partition) for p in partitions]

    def _refresh(self) -> None:
        reader = kafka.build_offsets_reader(group_id=self.group_id)
        lag_reported = 0.0
        try:
            while not self._stopped.wait(1.0):
                now = time.time()
                metrics.INBOX_LAST_POLL.labels(self.group_id).set(self._last_poll)
                metrics.INBOX_LAST_APPLIED.labels(self.group_id).set(self._last_applied)
                metrics.INBOX_SINCE_POLL.labels(self.group_id).set(now - self._last_poll)
                metrics.INBOX_SINCE_APPLIED.labels(self.group_id).set(now - self._last_applied)
                if time.monotonic() - lag_reported > LAG_REPORT_INTERVAL:
                    self._report_lag(reader)
                    lag_reported = time.monotonic()
        finally:
            reader.close()

    def _report_lag(self, reader) -> None:
        partitions = self._partitions
        if not partitions:
            return
        try:
            for (topic, partition), lag in kafka.partition_lags(reader, partitions, timeout=5).items():
                metrics.INBOX_LAG.labels(self.group_id, topic, str(partition)).set(lag)
        except kafka.KafkaException as exc:
            logger.debug("lag not available: %s", exc)


def consumer_from_settings() -> EventConsumer:
    return EventConsumer(
        group_id=settings.INBOX_GROUP_ID,
        topics=settings.INBOX_TOPICS,
        dlq_topic=settings.INBOX_DLQ_TOPIC,
        max_attempts=settings.INBOX_MAX_ATTEMPTS,
        backoff_base=settings.INBOX_BACKOFF_BASE,
        batch_size=settings.INBOX_BATCH_SIZE,
    )
