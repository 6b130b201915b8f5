"""The consume loop: poll, apply in one transaction, then commit the offset."""

import logging
import signal
import time
from datetime import datetime, timezone

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection

from ops import metrics

from . import kafka
from .models import ConsumerDeadLetter
from .services import PoisonMessage, RawMessage, dead_letter_record, inbound_event_apply, inbound_event_parse

logger = logging.getLogger(__name__)

# Losing the database is not the message's fault: wait for it, never dead-letter because of it. Only
# connection-level errors count: any other server error is the message's, and ends in the DLQ.
CONNECTION_ERROR_CODES = {1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031}


def database_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, OperationalError) and bool(exc.args) and exc.args[0] in CONNECTION_ERROR_CODES


class EventConsumer:
    def __init__(self, *, group_id: str, topics: list[str], dlq_topic: str, max_attempts: int, backoff_base: float):
        self.group_id = group_id
        self.topics = topics
        self.dlq_topic = dlq_topic
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.stopping = False
        self.stats = {"applied": 0, "duplicates": 0, "dead_lettered": 0}
        self._consumer = kafka.build_consumer(group_id=group_id)
        self._dlq_producer = None

    def stop(self, *_args) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> dict:
        """Consume until stopped (or, for tools and tests, after max_messages or idle_timeout seconds idle)."""
        self._consumer.subscribe(self.topics, on_revoke=self._on_revoke)
        handled = 0
        idle_since = time.monotonic()
        lag_reported = 0.0
        try:
            while not self.stopping:
                if time.monotonic() - lag_reported > 5:
                    self._report_lag()
                    lag_reported = time.monotonic()
                message = self._consumer.poll(0.5)
                if message is None:
                    if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                        break
                    continue
                if message.error():
                    if message.error().fatal():
                        raise kafka.KafkaException(message.error())
                    logger.warning("consumer: %s", message.error())
                    continue
                self._handle(message)
                # Only now is the message's effect (or its dead letter) durable: commit past it.
                self._consumer.store_offsets(message=message)
                self._consumer.commit(asynchronous=True)
                handled += 1
                idle_since = time.monotonic()
                if max_messages is not None and handled >= max_messages:
                    break
        finally:
            self._commit_sync()
            self._consumer.close()
            if self._dlq_producer is not None:
                self._dlq_producer.flush(10)
        return self.stats

    def _handle(self, message: kafka.Message) -> None:
        raw = RawMessage(
            topic=message.topic(), partition=message.partition(), offset=message.offset(),
            key=message.key(), value=message.value(), headers=list(message.headers() or []),
        )
        attempts = 0
        while True:
            attempts += 1
            try:
                event = inbound_event_parse(raw)
                applied = self._until_database_answers(lambda: inbound_event_apply(group_id=self.group_id, event=event, raw=raw))
                self.stats["applied" if applied else "duplicates"] += 1
                (metrics.INBOX_PROCESSED if applied else metrics.INBOX_DUPLICATES).labels(self.group_id).inc()
                if not applied:
                    logger.info("skipped duplicate event %s (%s)", event.event_id, event.event_type,
                                extra=self._context(raw, attempts, event.event_id))
                return
            except PoisonMessage as exc:
                return self._dead_letter(raw, f"poison message: {exc}", attempts)
            except Exception as exc:
                if database_unavailable(exc):
                    raise  # only while stopping: leave the offset uncommitted, the message comes back
                if attempts >= self.max_attempts:
                    return self._dead_letter(raw, f"handler failed: {exc!r}", attempts)
                logger.warning("handler failed for %s[%d]@%d (attempt %d): %r",
                               raw.topic, raw.partition, raw.offset, attempts, exc, extra=self._context(raw, attempts))
                time.sleep(self.backoff_base * 2 ** (attempts - 1))

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
        metrics.INBOX_DEAD_LETTERED.labels(self.group_id).inc()
        logger.error("dead-lettered %s[%d]@%d after %d attempt(s): %s", raw.topic, raw.partition, raw.offset,
                     attempts, error, extra=self._context(raw, attempts))
        if not record.dlq_published and self._publish_dead_letter(raw, error, attempts):
            self._until_database_answers(
                lambda: ConsumerDeadLetter.objects.filter(pk=record.pk).update(dlq_published=True)
            )

    def _publish_dead_letter(self, raw: RawMessage, error: str, attempts: int) -> bool:
        if self._dlq_producer is None:
            self._dlq_producer = kafka.build_producer()
        outcome = []
        headers = raw.headers + [
            ("dlq.error", error.encode()),
            ("dlq.attempts", str(attempts).encode()),
            ("dlq.originalTopic", raw.topic.encode()),
            ("dlq.originalPartition", str(raw.partition).encode()),
            ("dlq.originalOffset", str(raw.offset).encode()),
            ("dlq.consumerGroup", self.group_id.encode()),
            ("dlq.failedAt", datetime.now(timezone.utc).isoformat().encode()),
        ]
        try:
            self._dlq_producer.produce(
                self.dlq_topic, key=raw.key, value=raw.value, headers=headers,
                on_delivery=lambda err, _msg: outcome.append(err),
            )
        except (kafka.KafkaException, BufferError) as exc:  # refused locally (too large, queue full)
            outcome.append(exc)
        self._dlq_producer.flush(15)
        if outcome and outcome[0] is None:
            return True
        # The dead letter is in the database either way; the topic copy is for downstream tooling.
        logger.critical("could not write %s[%d]@%d to DLQ topic %s: %s; it is kept in the database",
                        raw.topic, raw.partition, raw.offset, self.dlq_topic, outcome[0] if outcome else "timeout")
        return False

    def _context(self, raw: RawMessage, attempt: int, event_id: str | None = None) -> dict:
        headers = raw.text_headers()
        return {
            "event_id": event_id or headers.get("id", ""), "order_id": headers.get("aggregateId", ""),
            "event_type": headers.get("eventType", ""), "attempt": attempt, "group": self.group_id,
            "topic": raw.topic, "partition": raw.partition, "offset": raw.offset,
        }

    def _report_lag(self) -> None:
        """Consumer lag per assigned partition, from the client's cached watermarks (no broker round trip)."""
        try:
            for position in self._consumer.position(self._consumer.assignment()):
                if position.offset < 0:
                    continue
                _, high = self._consumer.get_watermark_offsets(position, cached=True)
                if high >= 0:
                    metrics.INBOX_LAG.labels(self.group_id, position.topic, str(position.partition)).set(
                        max(high - position.offset, 0))
        except kafka.KafkaException as exc:
            logger.debug("lag not available: %s", exc)

    def _on_revoke(self, consumer, partitions) -> None:
        self._commit_sync()

    def _commit_sync(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except kafka.KafkaException as exc:
            if exc.args[0].code() != kafka.KafkaError._NO_OFFSET:
                logger.warning("offset commit failed (messages will be redelivered and deduped): %s", exc)
        except RuntimeError:
            pass  # consumer already closed


def consumer_from_settings() -> EventConsumer:
    return EventConsumer(
        group_id=settings.INBOX_GROUP_ID,
        topics=settings.INBOX_TOPICS,
        dlq_topic=settings.INBOX_DLQ_TOPIC,
        max_attempts=settings.INBOX_MAX_ATTEMPTS,
        backoff_base=settings.INBOX_BACKOFF_BASE,
    )
