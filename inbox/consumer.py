"""The consume loop, in two stages: this thread polls Kafka and reads a batch while a writer thread applies the
previous one in its database transaction; a batch's offsets are committed, in order, once the writer has
committed it to the database.

By concern: inbox.messages reads a message (anything unreadable is poison), inbox.handoff passes batches between
the threads and commits their offsets, inbox.writer applies a batch, inbox.dead_letters keeps what cannot be
applied, inbox.group answers rebalances, inbox.heartbeat keeps the gauges an alert watches.
"""

import logging
import signal
import sys
import time

from django.conf import settings

from ops.runtime import collect_garbage_for_batches

from . import kafka
from .group import Membership
from .handoff import Handoff
from .heartbeat import Heartbeat
from .messages import UNREADABLE_RECORD_CODES, has_record_position, message_read
from .writer import BatchWriter

logger = logging.getLogger(__name__)

# The writer thread spends most of a batch waiting for the database, with the GIL released; when an answer comes,
# it waits for the parsing thread to hand the GIL over, by default after up to 5 ms, several times per batch
# (measured: a third of the writer's rate lost at 5 ms, little at 0.1 ms).
SWITCH_INTERVAL = 0.0001


def tune_process_for_consuming() -> None:
    """Process-wide settings for a process that runs the consumer (consume_events)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    collect_garbage_for_batches()  # each batch allocates thousands of containers, and frees them by refcount


class EventConsumer:
    def __init__(self, *, group_id: str, topics: list[str], dlq_topic: str, max_attempts: int, backoff_base: float,
                 batch_size: int = 500):
        self.group_id = group_id
        self.topics = topics
        self.batch_size = max(1, batch_size)
        self.stopping = False
        self.writer = BatchWriter(group_id=group_id, dlq_topic=dlq_topic, max_attempts=max_attempts,
                                  backoff_base=backoff_base, stopping=lambda: self.stopping)
        self.stats = self.writer.stats
        self._consumer = kafka.build_consumer(group_id=group_id)
        self._heartbeat = Heartbeat(group_id)
        self.handoff = Handoff(self._consumer, self.writer.write, self._heartbeat)
        self._group = Membership(self._consumer, self.handoff, self._heartbeat, self.stop)

    def stop(self, *_args) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> dict:
        """Consume until stopped (or, for tools and tests, after max_messages or idle_timeout seconds idle)."""
        self._group.subscribe(self.topics)
        self._heartbeat.start()
        handled = 0
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                limit = self.batch_size if max_messages is None else min(self.batch_size, max_messages - handled)
                messages = self._next_batch(limit)
                self.handoff.commit_applied(wait=False)
                if not messages:
                    if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                        break
                    continue
                self.handoff.submit(messages, [message_read(message) for message in messages])
                handled += len(messages)
                idle_since = time.monotonic()
                if max_messages is not None and handled >= max_messages:
                    break
            self.handoff.finish()
        finally:
            self.stopping = True  # a writer waiting for the database gives up: its batch is not committed
            self.handoff.close()
            self._group.commit_sync()
            self._consumer.close()
            self._heartbeat.stop()
            self.writer.dead_letters.flush()
        return self.stats

    def _next_batch(self, limit: int) -> list[kafka.Message]:
        """Wait (briefly) for one message, then take whatever else has already arrived, up to limit: a lone
        event is applied at once, a backlog in batches. While the writer holds a batch, the wait is short, so
        that its offsets are committed soon after it is applied."""
        first = self._consumer.poll(0.02 if self.handoff.in_flight else 0.5)
        self._heartbeat.polled()
        if first is None:
            return []
        self._group.taking_a_batch()
        messages = [first] + (self._consumer.consume(limit - 1, timeout=0) if limit > 1 else [])
        batch = []
        for message in self._group.still_owned(messages):
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.fatal():
                raise kafka.KafkaException(error)
            elif error.code() in UNREADABLE_RECORD_CODES and has_record_position(message):
                batch.append(message)  # a record the client could not read (a corrupt batch): poison, dead-lettered
            else:
                logger.warning("consumer: %s", error)
        return batch


def consumer_from_settings() -> EventConsumer:
    return EventConsumer(
        group_id=settings.INBOX_GROUP_ID,
        topics=settings.INBOX_TOPICS,
        dlq_topic=settings.INBOX_DLQ_TOPIC,
        max_attempts=settings.INBOX_MAX_ATTEMPTS,
        backoff_base=settings.INBOX_BACKOFF_BASE,
        batch_size=settings.INBOX_BATCH_SIZE,
    )
