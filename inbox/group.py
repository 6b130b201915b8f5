"""The consumer's place in its group: the rebalance callbacks, and which taken messages it still owns.

Before partitions go, the writer finishes the batches it holds and what they applied is committed; a batch
taken while partitions were revoked keeps only what this consumer still owns (the new owner reads the rest
again from the committed offset).
"""

import logging
from collections.abc import Callable

from . import kafka
from .handoff import Handoff
from .heartbeat import Heartbeat

logger = logging.getLogger(__name__)


class Membership:
    def __init__(self, consumer: kafka.Consumer, handoff: Handoff, heartbeat: Heartbeat, stop: Callable[[], None]):
        self._consumer = consumer
        self._handoff = handoff
        self._heartbeat = heartbeat
        self._stop = stop
        self._rebalanced = False

    def subscribe(self, topics: list[str]) -> None:
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def taking_a_batch(self) -> None:
        self._rebalanced = False

    def still_owned(self, messages: list[kafka.Message]) -> list[kafka.Message]:
        """The messages taken since taking_a_batch() that this consumer still owns. (Messages of a partition
        assigned again are kept: a redelivery of them is skipped as duplicates.) Fatal errors are kept."""
        if not self._rebalanced:
            return messages
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        return [m for m in messages if (m.topic(), m.partition()) in owned or (m.error() and m.error().fatal())]

    def commit_sync(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except kafka.KafkaException as exc:
            if exc.args[0].code() != kafka.KafkaError._NO_OFFSET:
                logger.warning("offset commit failed (messages will be redelivered and deduped): %s", exc)
        except RuntimeError:
            pass  # consumer already closed

    def _on_assign(self, consumer, partitions) -> None:
        self._heartbeat.assigned(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        self._rebalanced = True
        self._heartbeat.assigned([])
        try:
            self._handoff.commit_applied(wait=True)
        except Exception:
            logger.exception("a batch failed while partitions were revoked; its offsets stay uncommitted")
            self._stop()  # the loop stops here: see the error above
        self.commit_sync()
