"""What the relay's tests share: an order body, the topics, enqueueing an event, driving the relay, and a
scripted producer for the tests of the relay's bookkeeping."""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from outbox.models import OutboxEvent
from outbox.services import outbox_enqueue
from relay import kafka
from relay.services import relay_run
from tests.kafka_tools import wait_for

TOPIC, DLQ = "outbox.event.order", "outbox.dlq"
ORDER = {"customer_id": "c-1", "items": [{"sku": "A-1", "quantity": 1, "unit_price": "5.00"}]}

RETRIABLE = kafka.Delivery(error="_TRANSPORT: broker down", retriable=True)
TOO_LARGE = kafka.Delivery(error="MSG_SIZE_TOO_LARGE: too big", retriable=False)
PRODUCER_FAILED = kafka.Delivery(error="the producer failed and is rebuilt: _FATAL", costs_attempt=False)


def relay_until(condition, *, timeout: float, message: str):
    """Run the relay repeatedly, as beat would, until condition() holds."""

    def step():
        relay_run(budget=1)
        return condition()

    return wait_for(step, timeout=timeout, interval=0.1, message=message)


def enqueue(aggregate_id: str, event_type: str) -> OutboxEvent:
    with transaction.atomic():
        return outbox_enqueue(aggregate_type="order", aggregate_id=aggregate_id, event_type=event_type,
                              payload={"order_id": aggregate_id})


def make_due():
    OutboxEvent.objects.filter(status="pending").update(available_at=timezone.now() - timedelta(seconds=1))


class ScriptedProducer:
    """Answers each event message by (aggregate id, event type): an error from `failing`, an ack otherwise.
    DLQ messages are always acknowledged."""

    def __init__(self):
        self.failing: dict[tuple[str, str], kafka.Delivery] = {}
        self.published: list[kafka.Message] = []

    def __call__(self, messages, *, timeout):
        self.published.extend(messages)
        ack = kafka.Delivery(partition=0, offset=len(self.published))
        deliveries = [ack if m.topic != TOPIC else self.failing.get(self._name(m), ack) for m in messages]
        kafka.producer.troubled = any(not d.ok and d.retriable for d in deliveries)
        return deliveries

    @staticmethod
    def _name(message):
        return message.key, dict(message.headers)["eventType"]

    def events(self, topic=TOPIC):
        return [self._name(m) for m in self.published if m.topic == topic]
