"""The relay's only contact with Kafka: one long-lived idempotent producer per process."""

import logging
import os
import threading
import time
from functools import partial
from typing import NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from django.conf import settings

from ops.kafka_log import client_logger
from ops.metrics import PRODUCER_REBUILT

logger = logging.getLogger(__name__)

# Errors that will not go away by retrying the same message: skip the retries, dead-letter at once.
NON_RETRIABLE_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_EXCEPTION,  # invalid topic name
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
        KafkaError._KEY_SERIALIZATION,
        KafkaError._VALUE_SERIALIZATION,
    }
)


# Tuples rather than dataclasses: one of each per event published, and a frozen dataclass costs ~3x to build.
class Message(NamedTuple):
    """What produce() takes; text is encoded as UTF-8 by the client."""

    topic: str
    key: str | bytes
    value: str | bytes
    headers: list[tuple[str, str | bytes]]


class Delivery(NamedTuple):
    """What the broker said about one message. `error` is None when it acknowledged it."""

    error: str | None = None
    retriable: bool = True
    partition: int | None = None
    offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


TIMED_OUT = Delivery(error="no delivery report before the publish timeout (maybe delivered)")


def _delivery_from_error(error: KafkaError) -> Delivery:
    retriable = error.code() not in NON_RETRIABLE_CODES and not error.fatal()
    return Delivery(error=f"{error.name()}: {error.str()}", retriable=retriable)


def producer_config() -> dict:
    timeout_ms = int(settings.OUTBOX_PUBLISH_TIMEOUT * 1000)
    return {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        # The Java clients' key hash: a key lands on the same partition whoever produces it
        # (a CDC connector, another service), so per-order order survives a switch of producer.
        "partitioner": "murmur2_random",
        "linger.ms": 2,  # a batch is produced in one loop anyway; a short linger keeps single events fast
        "message.timeout.ms": timeout_ms,
        "request.timeout.ms": min(timeout_ms, 30000),
        "socket.keepalive.enable": True,
        "logger": client_logger(),
        **settings.KAFKA_CONFIG,
        **settings.KAFKA_PRODUCER_CONFIG,
        # The guarantees the product is built on: not overridable.
        "enable.idempotence": True,
        "acks": "all",
    }


class _ProducerHolder:
    """One producer per process, built lazily so that each forked Celery child builds its own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._pid: int | None = None
        self.fatal_error: KafkaError | None = None

    def get(self) -> Producer:
        with self._lock:
            if self._producer is None or self._pid != os.getpid():
                self.fatal_error = None
                self._producer = Producer({**producer_config(), "error_cb": self._on_error})
                self._pid = os.getpid()
            return self._producer

    def discard(self, reason: str) -> None:
        with self._lock:
            if self._producer is not None and self._pid == os.getpid():
                logger.warning("discarding the Kafka producer and building a new one: %s", reason)
                PRODUCER_REBUILT.inc()
                # Messages still queued may yet be written: that is a duplicate, which consumers dedupe.
                self._producer.purge(in_queue=True, in_flight=False)
            self._producer = None

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal_error = error
            logger.error("fatal Kafka producer error: %s", error)
        else:
            logger.info("Kafka producer: %s", error)

    def flush(self, timeout: float) -> None:
        if self._producer is not None and self._pid == os.getpid():
            self._producer.flush(timeout)


producer = _ProducerHolder()


def publish(messages: list[Message], *, timeout: float) -> list[Delivery]:
    """Produce every message asynchronously and wait for all delivery reports (or the timeout).

    Returns one Delivery per message, in order. A fatal producer error, or a batch in which nothing
    was acknowledged and everything timed out, discards the producer: an idempotent producer whose
    broker lost its state can time out forever, while a new one delivers at once.
    """
    if not messages:
        return []
    kafka = producer.get()
    reports: list[Delivery | None] = [None] * len(messages)

    def on_delivery(index: int, error: KafkaError | None, msg) -> None:
        # Positional: one per message published, and keyword construction of a NamedTuple costs more.
        reports[index] = (Delivery(None, True, msg.partition(), msg.offset()) if error is None
                          else _delivery_from_error(error))

    for index, message in enumerate(messages):
        while True:
            try:
                kafka.produce(
                    message.topic, key=message.key, value=message.value, headers=message.headers,
                    on_delivery=partial(on_delivery, index),
                )
                break
            except BufferError:
                kafka.poll(0.05)  # local queue full: serve delivery reports to make room
            except KafkaException as exc:
                reports[index] = _delivery_from_error(exc.args[0])
                break
    # Wait for this batch's reports only (not flush(): other relay lanes share the producer).
    # The margin lets reports for messages that timed out arrive.
    deadline = time.monotonic() + timeout + 1.0
    while None in reports and time.monotonic() < deadline:
        kafka.poll(0.005)

    deliveries = [report or TIMED_OUT for report in reports]
    if producer.fatal_error is not None:
        producer.discard(f"fatal error {producer.fatal_error}")
    elif all(d.error is not None and d.retriable for d in deliveries) and any(
        d is TIMED_OUT or "TIMED_OUT" in (d.error or "") for d in deliveries
    ):
        producer.discard("no message of the batch was acknowledged before the timeout")
    return deliveries


def producer_warm_up() -> None:
    """Build this process's producer in a background thread: it connects, gets its idempotent producer id
    and the cluster's metadata (all topics: a one-off request per process)."""

    def warm_up() -> None:
        try:
            kafka = producer.get()
            kafka.list_topics(timeout=settings.OUTBOX_PUBLISH_TIMEOUT)
        except Exception as exc:  # the relay runs will report a broker that stays unreachable
            logger.info("Kafka producer warm-up did not finish: %s", exc)

    threading.Thread(target=warm_up, name="kafka-producer-warm-up", daemon=True).start()


def broker_metadata_reachable(*, timeout: float) -> None:
    """Raise unless a broker answers a metadata request within timeout seconds."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS, "logger": client_logger(),
                         **settings.KAFKA_CONFIG,
                         "socket.connection.setup.timeout.ms": int(timeout * 1000)})
    metadata = admin.list_topics(timeout=timeout)
    if not metadata.brokers:
        raise KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN, "no broker in the metadata"))
