"""Counting what reached a topic, from the broker: the benchmarks' end-of-window signal, with no query on the
database under test inside the window."""

import threading
import time

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition


class TopicCounter(threading.Thread):
    """Reads a topic from its beginning (from_end: from its end when it starts) and counts its messages;
    reached(n) waits until n have arrived and returns when (perf_counter) the n-th was read."""

    def __init__(self, bootstrap: str, topic: str, *, from_end: bool = False):
        super().__init__(daemon=True)
        self.count = 0
        self._marks: list[tuple[int, float]] = []  # (count, perf_counter) after each read
        self._stopping = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-counter",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_END if from_end else OFFSET_BEGINNING)
                               for p in partitions])
        if from_end:
            # The end is resolved when first fetched: fetch before anything is produced (Tansu's high watermarks
            # were seen lagging, so they are not read instead).
            self._consumer.poll(0.5)
        self.start()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                messages = self._consumer.consume(10000, timeout=0.05)
                if messages:
                    count = self.count + sum(1 for m in messages if m.error() is None)
                    self._marks.append((count, time.perf_counter()))
                    self.count = count  # after its mark: reached() finds one for any count it sees
        finally:
            self._consumer.close()

    def reached(self, n: int, *, timeout: float, alive=lambda: True) -> float:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"{self.count} of {n} messages reached the topic")
            time.sleep(0.01)
        return next(at for count, at in self._marks if count >= n)

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)
