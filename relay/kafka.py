"""The relay's only contact with Kafka: one long-lived idempotent producer per process."""

import logging
import os
import threading
import time
import weakref
from functools import partial
from typing import NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from django.conf import settings

from ops.kafka_log import client_logger
from ops.metrics import PRODUCER_FATAL_ERRORS, PRODUCER_REBUILT

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


# Failures of the producer, not of the event: a fatal error of the client (after a leader move the broker
# may answer an idempotent producer with sequence or producer-id errors it cannot recover from) and messages
# purged or destroyed with a discarded producer. The producer is rebuilt; the event goes again, at no attempt's cost.
PRODUCER_FAILURE_CODES = frozenset(
    {
        KafkaError._FATAL,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._DESTROY,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.PRODUCER_FENCED,
        KafkaError.DUPLICATE_SEQUENCE_NUMBER,
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
    """What the broker said about one message. `error` is None when it acknowledged it.

    retriable: False for a refusal for good (dead-letter at once). costs_attempt: False when the producer,
    not the event, failed (a fatal client error, a purge by a rebuild): the row goes again with no attempt counted.
    """

    error: str | None = None
    retriable: bool = True
    partition: int | None = None
    offset: int | None = None
    costs_attempt: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None


TIMED_OUT = Delivery(error="no delivery report before the publish timeout (maybe delivered)")


def _delivery_from_error(error: KafkaError) -> Delivery:
    if _is_producer_failure(error):
        return Delivery(error=f"{error.name()}: {error.str()}", costs_attempt=False)
    return Delivery(error=f"{error.name()}: {error.str()}", retriable=error.code() not in NON_RETRIABLE_CODES)


def _is_producer_failure(error: KafkaError) -> bool:
    return error.fatal() or error.code() in PRODUCER_FAILURE_CODES


def producer_config() -> dict:
    timeout_ms = int(settings.OUTBOX_PUBLISH_TIMEOUT * 1000)
    return {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        # The Java clients' key hash: a key lands on the same partition whoever produces it
        # (a CDC connector, another service), so per-order order survives a switch of producer.
        "partitioner": "murmur2_random",
        # Longer than producing a batch takes: nothing leaves while publish() produces it, and its flush then
        # sends it at once, in one request per partition (a short linger sent each batch in pieces, as its
        # ticks fell: more requests, more work for the broker and for this process, and later acks).
        "linger.ms": min(20, max(0, timeout_ms - 1)),  # librdkafka wants it under message.timeout.ms
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


class ProducerClient:
    """One librdkafka producer and the fatal error its error callback reported, if any.

    A fatal error leaves a producer unable to produce ever again: whoever sees one (a delivery report, an
    exception out of produce(), poll() or flush(), the error callback) discards this client, and the next
    publish builds a new one.
    """

    __slots__ = ("kafka", "fatal_error", "pid", "__weakref__")

    def __init__(self, config: dict):
        self.fatal_error: KafkaError | None = None
        self.pid = os.getpid()
        # The callback holds the client weakly: no reference cycle, so a discarded producer is destroyed (its
        # threads and sockets released, what it still queues dropped) as soon as the last lane lets go of it.
        self.kafka = Producer({**config, "error_cb": partial(_on_error, weakref.ref(self))})


def _on_error(client_ref, error: KafkaError) -> None:
    if error.fatal():
        client = client_ref()
        if client is not None:
            client.fatal_error = error
        logger.error("fatal Kafka producer error: %s", error)
    else:
        logger.info("Kafka producer: %s", error)


class ProducerHolder:
    """One producer per process (per config), built lazily so that each forked Celery child builds its own.

    discard(client) replaces only that client: a batch that saw its producer fail never discards a newer
    one that another lane or a later batch built meanwhile. The discarded producer is not purged: a lane
    still waiting on it keeps its reports, and it is destroyed when the last lane lets go of it.
    """

    def __init__(self, config=producer_config):
        self._config = config
        self._lock = threading.Lock()
        self._client: ProducerClient | None = None
        # Until when this process's publishes count as troubled (a failure that was not a refusal, within the last
        # TROUBLED_FOR seconds): the relay then publishes one event per order at a time (relay.ordering).
        self.troubled_until = 0.0
        # Fatal errors since the last acknowledged publish: the rows wait longer before each new producer.
        self.fatal_streak = 0

    @property
    def troubled(self) -> bool:
        return time.monotonic() < self.troubled_until

    @troubled.setter
    def troubled(self, value: bool) -> None:
        self.troubled_until = time.monotonic() + TROUBLED_FOR if value else 0.0

    @property
    def _producer(self) -> Producer | None:  # the current client's producer, if one is built (tests read it)
        return self._client.kafka if self._client is not None else None

    def get(self) -> ProducerClient:
        with self._lock:
            if self._client is None or self._client.pid != os.getpid():
                self._client = ProducerClient(self._config())
            return self._client

    def discard(self, reason: str, client: ProducerClient | None = None) -> bool:
        """Drop `client` (default: the current one) if it is still the current one. Returns whether it was."""
        with self._lock:
            current = self._client
            if current is None or (client is not None and client is not current):
                return False
            self._client = None
            if current.pid == os.getpid():
                logger.warning("discarding the Kafka producer and building a new one: %s", reason)
                PRODUCER_REBUILT.inc()
            return True

    def flush(self, timeout: float) -> None:
        client = self._client
        if client is not None and client.pid == os.getpid():
            try:
                client.kafka.flush(timeout)
            except KafkaException as exc:
                self.discard(f"flush failed: {exc}", client)


TROUBLED_FOR = 60.0
producer = ProducerHolder()


def publish(messages: list[Message], *, timeout: float, holder: ProducerHolder = producer) -> list[Delivery]:
    """Produce every message asynchronously and wait for all delivery reports (or the timeout).

    Returns one Delivery per message, in order. A fatal producer error, wherever it surfaces, discards the
    producer, and every message of the batch not acknowledged is reported as the producer's failure (no
    attempt counted). A batch in which nothing was acknowledged and everything timed out discards it too: an
    idempotent producer whose broker lost its state can time out forever, while a new one delivers at once.
    """
    if not messages:
        return []
    client = holder.get()
    kafka = client.kafka
    reports: list[Delivery | None] = [None] * len(messages)

    def on_delivery(index: int, error: KafkaError | None, msg) -> None:
        # Positional: one per message published, and keyword construction of a NamedTuple costs more.
        reports[index] = (Delivery(None, True, msg.partition(), msg.offset()) if error is None
                          else _delivery_from_error(error))

    fatal: KafkaError | None = None
    try:
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
                    if _is_producer_failure(exc.args[0]):
                        raise
                    reports[index] = _delivery_from_error(exc.args[0])
                    break
            if client.fatal_error is not None:
                break
        # Wait for this batch's reports (the margin lets reports for messages that timed out arrive) in short
        # flushes: a flush sends what is queued at once, without lingering. Short, because other relay lanes
        # share the producer and a flush waits for theirs too; the fatal error is checked in between.
        deadline = time.monotonic() + timeout + 1.0
        while None in reports and time.monotonic() < deadline and client.fatal_error is None:
            kafka.flush(0.005)
    except KafkaException as exc:
        if not _is_producer_failure(exc.args[0]):
            raise
        fatal = exc.args[0]
    fatal = fatal or client.fatal_error
    # `.error is not None` rather than `.ok` in the passes over every report: a property call per event adds up.
    reason = str(fatal) if fatal is not None else next(
        (r.error for r in reports if r is not None and r.error is not None and not r.costs_attempt), None)
    if reason is not None:
        if holder.discard(f"fatal error {reason}", client):
            PRODUCER_FATAL_ERRORS.inc()
            holder.fatal_streak += 1
        holder.troubled = True
        failed = Delivery(error=f"the producer failed and is rebuilt: {reason}", costs_attempt=False)
        return [r if r is not None and (r.ok or not r.retriable) else failed for r in reports]

    deliveries = [report or TIMED_OUT for report in reports]
    failed = [d for d in deliveries if d.error is not None]
    if len(failed) < len(deliveries):
        holder.fatal_streak = 0
    if not failed:
        return deliveries
    if any(d.retriable for d in failed):
        holder.troubled = True
    if len(failed) == len(deliveries) and all(d.retriable for d in failed) and any(
        d is TIMED_OUT or "TIMED_OUT" in d.error for d in failed
    ):
        holder.discard("no message of the batch was acknowledged before the timeout", client)
    return deliveries


def producer_warm_up() -> None:
    """Build this process's producer in a background thread: it connects, gets its idempotent producer id
    and the cluster's metadata (all topics: a one-off request per process)."""

    def warm_up() -> None:
        try:
            producer.get().kafka.list_topics(timeout=settings.OUTBOX_PUBLISH_TIMEOUT)
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
