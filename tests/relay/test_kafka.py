"""The producer: built in the background when a worker starts, rebuilt after the broker lost its state."""

import pytest

from outbox.models import OutboxEvent
from relay import kafka
from tests.kafka_tools import read_topic, wait_for
from tests.relay.helpers import ORDER, TOPIC, relay_until


def test_worker_warm_up_builds_the_producer_in_the_background(broker):
    kafka.producer.discard("fresh start for the test")
    kafka.producer_warm_up()
    wait_for(lambda: kafka.producer._producer is not None, timeout=10, message="producer built")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_producer_is_rebuilt_after_broker_restart(api, broker_outage):
    api.post("/api/orders/", ORDER, format="json")
    relay_until(lambda: OutboxEvent.objects.filter(status="sent").count() == 1, timeout=15, message="first sent")

    broker_outage.stop()
    broker_outage.start()  # a new, empty broker: the old producer's idempotence state means nothing to it
    api.post("/api/orders/", ORDER, format="json")
    relay_until(lambda: OutboxEvent.objects.filter(status="sent").count() == 2, timeout=30, message="sent after restart")

    latest = OutboxEvent.objects.latest("id")
    records = read_topic(broker_outage.bootstrap, TOPIC, keys={latest.aggregate_id}, until=lambda rs: len(rs) >= 1)
    assert {r.headers["id"] for r in records} == {str(latest.event_id)}
