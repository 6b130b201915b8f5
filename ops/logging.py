"""One JSON object per log line, with the event context the relay and consumer pass in `extra`."""

import json
import logging
from datetime import datetime, timezone

CONTEXT_FIELDS = ("event_id", "order_id", "event_type", "attempt", "group", "topic", "partition", "offset",
                  "sent", "retrying", "dead_lettered", "kafka_client")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for field in CONTEXT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
