"""The hand-off between the consumer's two threads: the polling thread hands parsed batches to the writer thread,
and commits each batch's offsets to Kafka, oldest first, once the writer has applied it to the database.

While the writer holds a batch, the polling thread keeps the consumer in its group (max.poll.interval.ms), however
long the batch's handlers, retries and DLQ publishes take.
"""

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from django.db import connection

from . import kafka
from .heartbeat import Heartbeat
from .messages import has_record_position, next_offsets

logger = logging.getLogger(__name__)

# Batches handed to the writer thread and not yet committed to Kafka: the one it applies, and the next one, parsed
# meanwhile. More would only hold more messages uncommitted.
IN_FLIGHT = 2
# While the writer holds a long batch, how often the polling thread polls (paused) to stay in the group.
POLL_WHILE_WRITING = 0.5


def _wait(future: Future, timeout: float) -> bool:
    try:
        future.exception(timeout=timeout)
        return True
    except TimeoutError:
        return False


class Handoff:
    def __init__(self, consumer: kafka.Consumer, write, heartbeat: Heartbeat):
        self._consumer = consumer
        self._write = write
        self._heartbeat = heartbeat
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox-writer")
        self.in_flight: deque[tuple[Future, list[kafka.TopicPartition]]] = deque()

    def submit(self, messages: list[kafka.Message], parsed: list) -> None:
        """Hand a batch to the writer; wait while IN_FLIGHT batches are not yet applied."""
        future = self._executor.submit(self._write, messages, parsed)
        self.in_flight.append((future, next_offsets(messages)))
        while len(self.in_flight) >= IN_FLIGHT:
            self._wait_serving_the_group(self.in_flight[0][0])  # the oldest
            self.commit_applied(wait=False)

    def finish(self) -> None:
        """Wait for every batch handed over, staying in the group, and commit them."""
        for future, _ in list(self.in_flight):
            self._wait_serving_the_group(future)
        self.commit_applied(wait=True)

    def commit_applied(self, *, wait: bool) -> None:
        """Commit the offsets of the batches the writer has applied, oldest first; with wait, of every batch
        handed to it. A batch that failed raises here: neither it nor any later batch is committed."""
        while self.in_flight and (wait or self.in_flight[0][0].done()):
            future, offsets = self.in_flight[0]
            future.result()
            self.in_flight.popleft()
            # Only now are the batch's effects (or its dead letters) durable: commit past them.
            self._consumer.store_offsets(offsets=offsets)
            self._consumer.commit(asynchronous=True)
            self._heartbeat.applied()

    def close(self) -> None:
        """Drop what is not committed (it is read again) and end the writer thread, closing its connection."""
        self.in_flight.clear()
        self._executor.submit(connection.close)
        self._executor.shutdown(wait=True)

    def _wait_serving_the_group(self, future: Future) -> None:
        """Wait for a batch the writer holds while staying in the group: this thread keeps calling poll(), with
        the partitions paused so that nothing new is taken meanwhile (librdkafka fetches them again from the
        position on resume)."""
        if _wait(future, POLL_WHILE_WRITING):
            return  # the usual case: no pause (it would drop what has been fetched ahead)
        try:
            self._consumer.pause(self._consumer.assignment())
            while not _wait(future, POLL_WHILE_WRITING):
                message = self._consumer.poll(0)
                self._heartbeat.polled()
                if message is not None and has_record_position(message):
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
