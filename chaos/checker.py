"""The checker: reads the order topic all through the run and records every message it sees.

The broker keeps data in memory only, so what it held is gone after a restart: the checker reads continuously,
by partition assignment (no consumer group), and after each broker restart reads the new, empty log from its
beginning again (a new "epoch").
"""

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from tests.kafka_tools import high_watermarks


@dataclass(frozen=True)
class Seen:
    seq: int  # arrival order in the checker
    epoch: int  # broker life: 1, then +1 after each restart
    partition: int
    offset: int
    key: str | None
    event_id: str | None
    event_type: str | None
    at: float  # time.monotonic() of arrival


class TopicChecker(threading.Thread):
    def __init__(self, bootstrap: str, topic: str):
        super().__init__(name="topic-checker", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Seen] = []
        self.epoch = 1
        self.positions: dict[int, int] = {}  # partition -> next offset to read, in the current epoch
        self.errors: Counter = Counter()
        self._lock = threading.Lock()
        self._stopping = False
        self._want_pause = False
        self._paused = threading.Event()
        self._positions_seen: set[tuple[int, int, int]] = set()

    # ------------------------------------------------------------------------------------------ control

    def pause(self, timeout: float = 15) -> bool:
        """Close the reader (before the broker is killed); the records stay."""
        self._paused.clear()
        self._want_pause = True
        return self._paused.wait(timeout)

    def resume(self) -> None:
        """The broker restarted (empty): read the new log from its beginning, as a new epoch."""
        with self._lock:
            self.epoch += 1
            self.positions = {}
        self._want_pause = False

    def stop(self) -> None:
        self._stopping = True
        self.join(20)

    def caught_up(self) -> bool:
        """True when the checker has read everything the broker holds right now."""
        try:
            marks = high_watermarks(self.bootstrap, self.topic)
        except Exception:
            return False
        with self._lock:
            positions = dict(self.positions)
        return bool(positions) and all(positions.get(p, 0) >= high for p, high in marks.items())

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.records)

    # ------------------------------------------------------------------------------------------ reading

    def _open(self) -> Consumer:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"chaos-checker-{uuid.uuid4()}",  # required by the client; never joined (assign only)
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
            "topic.metadata.refresh.interval.ms": 2000,
        })
        try:
            metadata = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            if metadata.error is not None or not metadata.partitions:
                raise RuntimeError(f"topic {self.topic}: {metadata.error}")
            partitions = sorted(metadata.partitions)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        except Exception:
            consumer.close()
            raise
        with self._lock:
            self.positions = {p: 0 for p in partitions}
        return consumer

    def run(self) -> None:
        consumer = None
        while not self._stopping:
            if self._want_pause:
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._paused.set()
                time.sleep(0.05)
                continue
            if consumer is None:
                try:
                    consumer = self._open()
                except Exception as exc:
                    self.errors[f"open: {type(exc).__name__}"] += 1
                    time.sleep(0.5)
                    continue
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    self.errors[message.error().name()] += 1
                continue
            self._record(message)
        if consumer is not None:
            consumer.close()

    def _record(self, message) -> None:
        headers = {k: (v or b"").decode(errors="replace") for k, v in (message.headers() or [])}
        event_id = headers.get("id")
        if event_id:
            try:
                event_id = str(uuid.UUID(event_id))
            except ValueError:
                pass
        with self._lock:
            position = (self.epoch, message.partition(), message.offset())
            self.positions[message.partition()] = max(self.positions.get(message.partition(), 0),
                                                      message.offset() + 1)
            if position in self._positions_seen:
                return  # the same stored message read twice by the checker: not a duplicate in Kafka
            self._positions_seen.add(position)
            self.records.append(Seen(
                seq=len(self.records), epoch=self.epoch, partition=message.partition(), offset=message.offset(),
                key=message.key().decode(errors="replace") if message.key() is not None else None,
                event_id=event_id, event_type=headers.get("eventType"), at=time.monotonic(),
            ))
