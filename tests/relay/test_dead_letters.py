"""Exhausted events, each made to happen for real against the test broker: refused payloads and topics go
to the DLQ topic at once, an unreachable DLQ topic is logged and swept later, and the sweeper gives up."""

import json
import logging

import pytest
from django.db import transaction

from outbox.models import FailedEvent, OutboxEvent
from outbox.services import outbox_enqueue
from relay.services import dead_letters_retry, relay_publish_batch
from tests.contract import assert_matches_contract
from tests.kafka_tools import high_watermarks, read_topic, wait_for
from tests.relay.helpers import DLQ, ORDER, TOPIC, relay_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_retries")]


def test_payload_too_large_is_dead_lettered_at_once_and_others_flow(api, broker):
    start, dlq_start = high_watermarks(broker.bootstrap, TOPIC), high_watermarks(broker.bootstrap, DLQ)
    with transaction.atomic():
        big = outbox_enqueue(aggregate_type="order", aggregate_id="big-1", event_type="OrderCreated",
                             payload={"blob": "x" * 2_000_000})
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]

    relay_until(lambda: not OutboxEvent.objects.filter(status="pending").exists(), timeout=20, message="drained")

    big.refresh_from_db()
    assert big.status == "dead" and big.attempts == 1
    failed = FailedEvent.objects.get()
    assert failed.event_id == big.event_id and failed.attempts == 1
    assert "MSG_SIZE_TOO_LARGE" in failed.error
    assert failed.status == FailedEvent.Status.DEAD_LETTERED
    assert failed.payload == {"blob": "x" * 2_000_000}

    (dead_letter,) = read_topic(broker.bootstrap, DLQ, start=dlq_start, keys={"big-1"}, until=lambda rs: len(rs) >= 1)
    assert dead_letter.headers["id"] == str(big.event_id)
    assert dead_letter.headers["eventType"] == "OrderCreated"
    assert "MSG_SIZE_TOO_LARGE" in dead_letter.headers["dlq.error"]
    assert dead_letter.headers["dlq.attempts"] == "1"
    assert dead_letter.headers["dlq.originalTopic"] == TOPIC
    assert dead_letter.headers["dlq.failedAt"]
    assert "dlq.valueOmitted" in dead_letter.headers  # too large for the DLQ too; the payload is in the table

    read_topic(broker.bootstrap, TOPIC, start=start, keys={str(order_id)}, until=lambda rs: len(rs) >= 1)


def test_invalid_topic_is_dead_lettered_at_once_with_its_value(api, broker, settings):
    settings.OUTBOX_TOPIC_PREFIX = "bad topic name "  # the broker refuses it; the DLQ topic is fine
    dlq_start = high_watermarks(broker.bootstrap, DLQ)
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]

    relay_until(lambda: FailedEvent.objects.exists(), timeout=30, message="dead-lettered")

    failed = FailedEvent.objects.get()
    assert failed.status == FailedEvent.Status.DEAD_LETTERED and failed.attempts == 1
    (dead_letter,) = read_topic(broker.bootstrap, DLQ, start=dlq_start, keys={str(order_id)}, until=lambda rs: len(rs) >= 1)
    assert json.loads(dead_letter.value)["order_id"] == str(order_id)
    assert_matches_contract(dead_letter, message="RelayDeadLetter")
    assert dead_letter.headers["dlq.originalTopic"] == "bad topic name order"


def test_dlq_unreachable_records_failure_logs_critical_and_sweeper_delivers_later(api, broker_outage, settings, caplog):
    settings.OUTBOX_MAX_ATTEMPTS, settings.OUTBOX_GIVE_UP_AFTER = 1, 0  # an outage exhausts at once here
    settings.OUTBOX_DLQ_RETRY_INTERVAL = 0
    broker_outage.stop()
    api.post("/api/orders/", ORDER, format="json")
    event = OutboxEvent.objects.get()

    with caplog.at_level(logging.CRITICAL, logger="relay.dead_letters"):
        result = relay_publish_batch()
    assert result.dead == 1
    failed = FailedEvent.objects.get()
    assert failed.status == FailedEvent.Status.DLQ_PENDING and failed.dlq_attempts == 1
    assert failed.dlq_error
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and str(event.event_id) in critical[0].getMessage()
    event.refresh_from_db()
    assert event.status == "dead"

    broker_outage.start()
    dlq_start = high_watermarks(broker_outage.bootstrap, DLQ)
    wait_for(lambda: dead_letters_retry() and FailedEvent.objects.get().status == FailedEvent.Status.DEAD_LETTERED,
             timeout=30, interval=0.2, message="sweeper published the dead letter")
    (dead_letter,) = read_topic(broker_outage.bootstrap, DLQ, start=dlq_start, keys={event.aggregate_id},
                                until=lambda rs: len(rs) >= 1)
    assert dead_letter.headers["id"] == str(event.event_id)


def test_sweeper_gives_up_after_its_retries_and_marks_failed(api, broker_outage, settings):
    settings.OUTBOX_MAX_ATTEMPTS, settings.OUTBOX_GIVE_UP_AFTER = 1, 0  # an outage exhausts at once here
    settings.OUTBOX_DLQ_RETRY_INTERVAL = 0
    settings.OUTBOX_DLQ_MAX_RETRIES = 2
    broker_outage.stop()
    api.post("/api/orders/", ORDER, format="json")
    relay_publish_batch()

    assert dead_letters_retry() == 1
    assert FailedEvent.objects.get().status == FailedEvent.Status.DLQ_PENDING
    assert dead_letters_retry() == 1
    failed = FailedEvent.objects.get()
    assert failed.status == FailedEvent.Status.FAILED and failed.dlq_attempts == 3
    assert dead_letters_retry() == 0  # no longer swept; an operator requeues it
