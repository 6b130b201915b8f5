"""librdkafka's own log lines through Python logging, in the configured format, and repeats held back.

Every Kafka client of the product is built with `"logger": client_logger()`: the client's lines (a broker
unreachable, a disconnect) then come out as records of the `kafka.client` logger, served from the client's poll,
instead of raw `%3|...|FAIL|...` lines on stderr. During an outage librdkafka repeats the same line every
reconnect backoff (thousands in minutes); the filter lets the first line of a kind (client, facility, broker
thread) through, then one per KAFKA_LOG_REPEAT_INTERVAL carrying the count of those it held back.
"""

import logging
import threading
import time

from django.conf import settings

LOGGER_NAME = "kafka.client"


class RepeatFilter(logging.Filter):
    def __init__(self, interval: float):
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        self._kinds: dict[tuple, tuple[float, int]] = {}  # kind -> (when its last line went out, lines held since)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.args, tuple) and len(record.args) == 3):
            return True  # not a librdkafka line (confluent-kafka logs "%s [%s] %s" % (facility, client, text))
        facility, client, text = record.args
        broker_thread = text.split("]", 1)[0] if text.startswith("[thrd:") else ""
        kind = (client, facility, broker_thread)
        now = time.monotonic()
        with self._lock:
            last, held = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self.interval:
                self._kinds[kind] = (last, held + 1)
                return False
            self._kinds[kind] = (now, 0)
        record.kafka_client = client
        if held:
            record.msg += " (%d more like it in the last %.0f s)"
            record.args = (facility, client, text, held, now - last)
        return True


_filter_lock = threading.Lock()


def client_logger() -> logging.Logger:
    """The logger to give a Kafka client's configuration (its "logger" property)."""
    logger = logging.getLogger(LOGGER_NAME)
    with _filter_lock:
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(settings.KAFKA_LOG_REPEAT_INTERVAL))
    return logger
