"""The consumer side's only contact with Kafka."""

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from django.conf import settings

from ops.kafka_log import client_logger

__all__ = ["Consumer", "KafkaError", "KafkaException", "Message", "TopicPartition", "build_consumer", "build_producer"]


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


def build_producer() -> Producer:
    """For the consumer's DLQ topic."""
    return Producer(
        {
            "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
            "message.timeout.ms": 10000,
            "logger": client_logger(),
            **settings.KAFKA_CONFIG,
            **settings.KAFKA_PRODUCER_CONFIG,
            "enable.idempotence": True,
            "acks": "all",
        }
    )


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
