"""Every Prometheus metric of the project, named in one place.

Counters and histograms are updated where things happen (relay, consumer). With PROMETHEUS_MULTIPROC_DIR
set (make run and docker-compose set it), every process on the host -- gunicorn workers, Celery prefork
children, the consumer -- writes to that directory and the web /metrics serves their sum. Gauges about
the outbox are read from the database at scrape time, so they are right whichever process asks.
"""

from prometheus_client import Counter, Gauge, Histogram

OUTBOX_PUBLISHED = Counter("outbox_events_published", "Outbox events acknowledged by Kafka")
OUTBOX_RETRIED = Counter("outbox_events_retried", "Publish attempts that failed and were scheduled again")
OUTBOX_DEAD_LETTERED = Counter("outbox_events_dead_lettered", "Outbox events exhausted and dead-lettered")
OUTBOX_REQUEUED = Counter("outbox_events_requeued", "Failed events put back into the outbox by an operator")
OUTBOX_PUBLISH_LATENCY = Histogram(
    "outbox_publish_latency_seconds",
    "From the event's write (occurredAt) to the broker's acknowledgement (at most 100 events sampled per batch)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PRODUCER_REBUILT = Counter("outbox_producer_rebuilt", "Kafka producers discarded and rebuilt")
# Relay, DLQ and consumer-DLQ producers alike: each one is followed by a rebuild.
PRODUCER_FATAL_ERRORS = Counter("outbox_producer_fatal_errors", "Fatal errors reported by a Kafka producer")

INBOX_PROCESSED = Counter("inbox_events_processed", "Events applied by the consumer", ["group"])
INBOX_DUPLICATES = Counter("inbox_duplicates_skipped", "Redelivered events skipped by the consumer", ["group"])
INBOX_DEAD_LETTERED = Counter("inbox_dead_lettered", "Messages the consumer dead-lettered", ["group"])
INBOX_LAG = Gauge("inbox_consumer_lag", "Messages behind the partition's end", ["group", "topic", "partition"],
                  multiprocess_mode="max")
# When the consumer last polled the broker and last applied a batch, and the seconds since (kept growing by a
# thread of the consumer while its loop is stuck). Alert on seconds since polling, and on seconds since applying
# while the lag is above zero (an idle topic applies nothing and is fine).
INBOX_LAST_POLL = Gauge("inbox_last_poll_timestamp_seconds", "When the consumer last polled", ["group"],
                        multiprocess_mode="max")
INBOX_LAST_APPLIED = Gauge("inbox_last_applied_timestamp_seconds", "When the consumer last applied a batch",
                           ["group"], multiprocess_mode="max")
INBOX_SINCE_POLL = Gauge("inbox_seconds_since_last_poll", "Seconds since the consumer last polled", ["group"],
                         multiprocess_mode="max")
INBOX_SINCE_APPLIED = Gauge("inbox_seconds_since_last_applied", "Seconds since the consumer last applied a batch",
                            ["group"], multiprocess_mode="max")
