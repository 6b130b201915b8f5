"""The chaos comparison's baseline (chaos.direct_publish, the approach the product replaces) does what it says:
it cannot be loaded by mistake, it sends the relay's message for an event after the commit, and against a broker
that does not answer it gives up after 3 attempts with an error log: the event is lost."""

import logging
import os
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
from django.test import override_settings

from tests.kafka_tools import free_port, read_topic


@pytest.fixture
def direct_publish(monkeypatch):
    import orders.services

    monkeypatch.setenv("CHAOS_DIRECT_PUBLISH_ACKS", "all")
    product_enqueue = orders.services.outbox_enqueue
    from chaos import direct_publish  # replaces orders.services.outbox_enqueue for good, as its web app needs

    orders.services.outbox_enqueue = product_enqueue  # for this test only, then back to the product's
    monkeypatch.setattr(orders.services, "outbox_enqueue", direct_publish.publish_after_commit)
    monkeypatch.setattr(direct_publish, "PAUSE", 0.05)
    monkeypatch.setattr(direct_publish, "DELIVERY_TIMEOUT", 0.5)
    return direct_publish


def test_the_baseline_refuses_to_load_unless_asked_for_by_name():
    env = {k: v for k, v in os.environ.items() if k != "CHAOS_DIRECT_PUBLISH_ACKS"}
    done = subprocess.run([sys.executable, "-c", "import chaos.direct_publish"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "CHAOS_DIRECT_PUBLISH_ACKS" in done.stderr


@pytest.mark.django_db(transaction=True)
def test_an_order_committed_through_the_baseline_reaches_kafka_as_the_relay_would_send_it(broker, direct_publish,
                                                                                         monkeypatch):
    from orders.services import ItemInput, order_create

    # The fixture's half-second timeout is for a broker that does not answer; a new producer's first send to a
    # topic just created was seen to take longer on a loaded machine (the event then lost, by design of the
    # baseline). A publisher of this test's own, built with the baseline's real timeout.
    monkeypatch.setattr(direct_publish, "DELIVERY_TIMEOUT", 2.0)
    monkeypatch.setattr(direct_publish, "publisher", direct_publish.DirectPublisher("all"))
    from outbox.models import OutboxEvent
    from django.contrib.auth import get_user_model

    prefix = f"baseline-{uuid.uuid4().hex[:8]}."
    broker.create_topics(prefix + "order")
    user = get_user_model().objects.create(username=f"u-{uuid.uuid4().hex[:6]}")
    with override_settings(OUTBOX_TOPIC_PREFIX=prefix, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap):
        order = order_create(owner=user, customer_id="c-9", items=[ItemInput(sku="A", quantity=2, unit_price=Decimal("1.50"))])
        (record,) = read_topic(broker.bootstrap, prefix + "order", until=lambda rs: len(rs) >= 1, timeout=20)
    assert OutboxEvent.objects.count() == 0  # nothing is written with the order: that is the point
    assert record.key == str(order.pk)
    assert record.headers["eventType"] == "OrderCreated" and record.headers["aggregateId"] == str(order.pk)
    assert {"id", "aggregateType", "occurredAt"} <= set(record.headers)


def test_against_a_broker_that_does_not_answer_the_baseline_gives_up_after_three_attempts(direct_publish, caplog):
    from relay.claim import Claimed
    from datetime import datetime

    message = Claimed(id=0, event_id=str(uuid.uuid4()), aggregate_type="order", aggregate_id="7",
                      event_type="OrderCreated", payload="{}", occurred_at=datetime(2026, 1, 1), attempts=0).message()
    publisher = direct_publish.DirectPublisher("1")
    with override_settings(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"):  # nothing listens there
        from confluent_kafka import Producer

        publisher._producer = Producer(direct_publish.producer_config("1"))
    with caplog.at_level(logging.WARNING, logger="chaos.direct_publish"):
        assert publisher.send(message) is False
    attempts = [r for r in caplog.records if "publish attempt" in r.getMessage()]
    assert len(attempts) == 3
    (gave_up,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "not published after 3 attempts" in gave_up.getMessage() and "order 7" in gave_up.getMessage()


def test_the_baseline_builds_a_new_producer_after_a_fatal_error(direct_publish):
    """Else one fenced idempotent producer would lose every later event, which is a dead client's loss, not the
    approach's."""
    from confluent_kafka import KafkaError, KafkaException

    assert direct_publish._fatal(KafkaException(KafkaError(KafkaError._FATAL)))
    assert direct_publish._fatal(KafkaError(KafkaError.UNKNOWN_PRODUCER_ID, fatal=True))
    assert not direct_publish._fatal(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert not direct_publish._fatal("no delivery report")
