"""The consumer's heartbeat: what an alert watches, kept up by a thread of its own."""

import logging
import threading
import time

from ops import metrics

from . import kafka

logger = logging.getLogger(__name__)

LAG_REPORT_INTERVAL = 5.0


class Heartbeat:
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
