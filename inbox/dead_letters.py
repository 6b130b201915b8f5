"""Consumer dead letters: a message no retry applied is kept in the database (ConsumerDeadLetter) and written
to the DLQ topic with its original bytes and headers; operators replay them from the admin.

A dead letter is identified by its position and a fingerprint of the message's bytes, so that a topic created
again (offsets from 0 again) gets new dead letters, never an old one's.
"""

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone as dt_timezone

from django.utils import timezone

from ops import metrics
from relay import kafka as producing  # the product's producer: idempotent, rebuilt after a fatal error

from . import kafka
from .apply import inbound_events_apply
from .messages import RawMessage, inbound_event_parse
from .models import ConsumerDeadLetter

logger = logging.getLogger(__name__)


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


class DeadLetterer:
    """The consumer's dead-lettering: record the message (first, so it is kept whatever the DLQ topic does), log
    and count it, then write it to the DLQ topic with its original bytes, headers and dlq.* headers."""

    def __init__(self, *, group_id: str, dlq_topic: str, until_database_answers):
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self._until_database_answers = until_database_answers
        self._producer: producing.ProducerHolder | None = None  # built at the first dead letter

    def dead_letter(self, raw: RawMessage, error: str, attempts: int, *, span=None) -> None:
        record = self._until_database_answers(
            lambda: dead_letter_record(group_id=self.group_id, raw=raw, error=error, attempts=attempts,
                                       dlq_topic=self.dlq_topic)
        )
        if span is not None:
            span.add_event("dead-lettered", {"messaging.kafka.offset": raw.offset, "exception.message": error,
                                             "messaging.destination.partition.id": str(raw.partition)})
        metrics.INBOX_DEAD_LETTERED.labels(self.group_id).inc()
        logger.error("dead-lettered %s[%d]@%d after %d attempt(s): %s", raw.topic, raw.partition, raw.offset,
                     attempts, error, extra=log_context(self.group_id, raw, attempts))
        if not record.dlq_published and self._publish(raw, error, attempts):
            self._until_database_answers(
                lambda: ConsumerDeadLetter.objects.filter(pk=record.pk).update(dlq_published=True)
            )

    def _publish(self, raw: RawMessage, error: str, attempts: int) -> bool:
        if self._producer is None:
            self._producer = producing.ProducerHolder(config=kafka.dlq_producer_config)
        headers = raw.headers + [
            ("dlq.error", error.encode()),
            ("dlq.attempts", str(attempts).encode()),
            ("dlq.originalTopic", raw.topic.encode()),
            ("dlq.originalPartition", str(raw.partition).encode()),
            ("dlq.originalOffset", str(raw.offset).encode()),
            ("dlq.consumerGroup", self.group_id.encode()),
            ("dlq.failedAt", datetime.now(dt_timezone.utc).isoformat().encode()),
        ]
        message = producing.Message(self.dlq_topic, raw.key, raw.value, headers)
        delivery = producing.publish([message], timeout=15, holder=self._producer)[0]
        if delivery.ok:
            return True
        # The dead letter is in the database either way; the topic copy is for downstream tooling.
        logger.critical("could not write %s[%d]@%d to DLQ topic %s: %s; it is kept in the database",
                        raw.topic, raw.partition, raw.offset, self.dlq_topic, delivery.error)
        return False

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)


def log_context(group_id: str, raw: RawMessage, attempt: int, event_id: str | None = None) -> dict:
    """The structured fields of the consumer's log lines about one message."""
    headers = raw.text_headers()
    return {
        "event_id": event_id or headers.get("id", ""), "order_id": headers.get("aggregateId", ""),
        "event_type": headers.get("eventType", ""), "attempt": attempt, "group": group_id,
        "topic": raw.topic, "partition": raw.partition, "offset": raw.offset,
    }
