"""The consumer side's only contact with Kafka."""

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from django.conf import settings

from ops.kafka_log import client_logger

__all__ = ["Consumer", "KafkaError", "KafkaException", "Message", "TopicPartition", "build_consumer", "dlq_producer_config"]


def build_consumer(*, group_id: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "max.poll.interval.ms": 300000,
            # How long a fetch may wait at the broker for data. Kafka answers as soon as a byte is there; some
            # Kafka-protocol brokers hold the fetch for the whole wait, which then bounds the event's latency.
            "fetch.wait.max.ms": 25,
            "logger": client_logger(),
            **settings.KAFKA_CONFIG,
            **settings.KAFKA_CONSUMER_CONFIG,
            "group.id": group_id,
            # Offsets are committed by hand, only after the database transaction committed.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )


def dlq_producer_config() -> dict:
    """For the consumer's DLQ topic (a relay.kafka.ProducerHolder: rebuilt after a fatal error)."""
    return {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "message.timeout.ms": 10000,
        "logger": client_logger(),
        **settings.KAFKA_CONFIG,
        **settings.KAFKA_PRODUCER_CONFIG,
        "enable.idempotence": True,
        "acks": "all",
    }


def build_offsets_reader(*, group_id: str) -> Consumer:
    """A client that never joins the group, for the lag gauge: its queries do not wait behind the consumer's
    fetches, nor stall its loop."""
    return Consumer({
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "logger": client_logger(),
        **settings.KAFKA_CONFIG,
        **settings.KAFKA_CONSUMER_CONFIG,
        "group.id": group_id,
        "enable.auto.commit": False,
    })


def partition_lags(reader: Consumer, partitions: list[TopicPartition], *, timeout: float) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the broker's high watermark (asked, not cached) minus the group's committed offset
    (what it has durably applied; a partition it never committed counts from the low watermark)."""
    lags = {}
    for committed in reader.committed(partitions, timeout=timeout):
        low, high = reader.get_watermark_offsets(committed, timeout=timeout, cached=False)
        applied_up_to = committed.offset if committed.offset >= 0 else low
        lags[(committed.topic, committed.partition)] = max(high - applied_up_to, 0)
    return lags


def group_lag(group_id: str, topics: list[str], *, timeout: float = 2.0) -> int | None:
    """The group's total lag over every partition of `topics`, or None when the broker does not answer in time."""
    reader = build_offsets_reader(group_id=group_id)
    try:
        partitions = []
        for topic in topics:
            metadata = reader.list_topics(topic, timeout=timeout).topics[topic]
            if metadata.error is not None:
                return None
            partitions += [TopicPartition(topic, p) for p in metadata.partitions]
        return sum(partition_lags(reader, partitions, timeout=timeout).values())
    except KafkaException:
        return None
    finally:
        reader.close()
