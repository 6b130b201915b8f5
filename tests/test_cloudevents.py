"""Every published message is also a CloudEvent in the Kafka binding's binary mode, read back from the real broker
with the CloudEvents SDK."""

import uuid

import pytest
from cloudevents.core.bindings import kafka as cloudevents_kafka

from outbox.models import OutboxEvent
from relay.services import relay_run
from tests.contract import assert_matches_contract
from tests.kafka_tools import high_watermarks, read_topic

TOPIC = "outbox.event.order"
ORDER = {"customer_id": "c-ce", "items": [{"sku": "A-1", "quantity": 1, "unit_price": "5.00"}]}

pytestmark = pytest.mark.django_db(transaction=True)


def as_cloudevent(record):
    message = cloudevents_kafka.KafkaMessage(
        headers={name: value.encode() for name, value in record.headers.items()},
        key=record.key.encode(), value=record.value)
    return cloudevents_kafka.from_binary_event(message)


def test_the_relays_messages_read_as_cloudevents_with_the_rows_attributes_and_data(broker, api, settings):
    settings.OUTBOX_CLOUDEVENTS_SOURCE = f"/order-service/test-{uuid.uuid4().hex[:6]}"
    start = high_watermarks(broker.bootstrap, TOPIC)
    order_id = str(api.post("/api/orders/", ORDER, format="json").json()["id"])
    api.post(f"/api/orders/{order_id}/cancel/")
    assert relay_run(budget=5).sent == 2

    records = read_topic(broker.bootstrap, TOPIC, start=start, keys={order_id}, until=lambda rs: len(rs) >= 2)
    rows = {str(row.event_id): row for row in OutboxEvent.objects.filter(aggregate_id=order_id)}
    for record in records:
        assert_matches_contract(record)
        event = as_cloudevent(record)
        row = rows[event.get_id()]
        assert event.get_specversion() == "1.0"
        assert event.get_type() == row.event_type
        assert event.get_source() == settings.OUTBOX_CLOUDEVENTS_SOURCE
        assert event.get_time() == row.occurred_at
        assert event.get_subject() == order_id
        assert event.get_datacontenttype() == "application/json"
        assert event.get_data() == row.payload
        # The Debezium-style headers are still there, for everything written against them.
        assert (record.headers["id"], record.headers["eventType"]) == (event.get_id(), event.get_type())
    assert [as_cloudevent(r).get_type() for r in records] == ["OrderCreated", "OrderCancelled"]
