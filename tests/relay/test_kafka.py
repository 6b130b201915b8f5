"""The producer: built in the background when a worker starts, rebuilt after the broker lost its state, and
configured with what the guarantees rest on whatever the settings say."""

import logging

import pytest

from outbox.models import OutboxEvent
from ops import metrics
from relay import kafka
from tests.kafka_tools import read_topic, wait_for
from tests.relay.helpers import ORDER, TOPIC, relay_until


def test_worker_warm_up_builds_the_producer_in_the_background(broker):
    kafka.producer.discard("fresh start for the test")
    kafka.producer_warm_up()
    wait_for(lambda: kafka.producer._producer is not None, timeout=10, message="producer built")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_producer_is_rebuilt_after_broker_restart(api, broker_outage, caplog):
    api.post("/api/orders/", ORDER, format="json")
    relay_until(lambda: OutboxEvent.objects.filter(status="sent").count() == 1, timeout=15, message="first sent")
    rebuilt_before = metrics.PRODUCER_REBUILT._value.get()
    caplog.set_level(logging.WARNING, logger="relay.kafka")

    broker_outage.stop()
    broker_outage.start()  # a new, empty broker: the old producer's idempotence state means nothing to it
    api.post("/api/orders/", ORDER, format="json")
    relay_until(lambda: OutboxEvent.objects.filter(status="sent").count() == 2, timeout=30, message="sent after restart")

    latest = OutboxEvent.objects.latest("id")
    records = read_topic(broker_outage.bootstrap, TOPIC, keys={latest.aggregate_id}, until=lambda rs: len(rs) >= 1)
    assert {r.headers["id"] for r in records} == {str(latest.event_id)}
    # Delivery resumed because the producer was rebuilt, not by luck: the counter and the log line say so.
    assert metrics.PRODUCER_REBUILT._value.get() > rebuilt_before
    assert any("discarding the Kafka producer and building a new one" in r.getMessage() for r in caplog.records)


def test_idempotence_and_acks_all_cannot_be_overridden_by_settings(settings):
    settings.KAFKA_CONFIG = {"enable.idempotence": False, "acks": "1", "compression.type": "zstd"}
    settings.KAFKA_PRODUCER_CONFIG = {"acks": "0", "enable.idempotence": "false"}

    config = kafka.producer_config()

    assert (config["enable.idempotence"], config["acks"]) == (True, "all")
    assert config["compression.type"] == "zstd"  # everything else passes through


def test_a_batch_is_sent_at_once_whatever_the_linger(broker, settings):
    """publish() flushes what it produced: with a linger far longer than the publish timeout, every message is
    still acknowledged (a producer left to its linger would report them all timed out)."""
    settings.OUTBOX_PUBLISH_TIMEOUT = 10  # message.timeout.ms, which librdkafka wants above the linger
    settings.KAFKA_PRODUCER_CONFIG = {"linger.ms": 9_000}
    holder = kafka.ProducerHolder()
    messages = [kafka.Message(TOPIC, f"linger-{n}", "{}", [("id", f"linger-{n}")]) for n in range(50)]

    deliveries = kafka.publish(messages, timeout=3, holder=holder)

    assert [d.error for d in deliveries] == [None] * 50
    assert all(d.offset is not None for d in deliveries)
