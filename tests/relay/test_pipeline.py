import json

import pytest

from outbox.models import OutboxEvent
from tests.contract import assert_matches_contract
from tests.kafka_tools import high_watermarks, read_topic, wait_for

TOPIC = "outbox.event.order"
ORDER = {"customer_id": "c-1", "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}]}


@pytest.mark.django_db(transaction=True)
def test_order_created_over_the_api_reaches_kafka_through_a_real_worker(celery_worker, broker, api):
    start = high_watermarks(broker.bootstrap, TOPIC)

    order = api.post("/api/orders/", ORDER, format="json").json()
    event = OutboxEvent.objects.get()

    records = read_topic(broker.bootstrap, TOPIC, start=start, keys={str(order["id"])}, until=lambda rs: len(rs) >= 1)
    assert len(records) == 1
    record = records[0]
    assert_matches_contract(record)
    assert record.key == str(order["id"])
    assert json.loads(record.value) == {
        "order_id": str(order["id"]), "customer_id": "c-1", "total": "19.98",
        "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}],
    }
    assert record.headers["id"] == str(event.event_id)
    assert record.headers["eventType"] == "OrderCreated"
    assert record.headers["aggregateType"] == "order"
    assert record.headers["aggregateId"] == str(order["id"])
    assert record.headers["occurredAt"] == event.occurred_at.isoformat()

    sent = wait_for(lambda: OutboxEvent.objects.filter(pk=event.pk, status="sent").first(), timeout=10, message="row marked sent")
    assert (sent.kafka_partition, sent.kafka_offset) == (record.partition, record.offset)
    assert sent.published_at is not None


@pytest.mark.django_db(transaction=True)
def test_created_then_cancelled_arrive_in_order_under_one_key(celery_worker, broker, api):
    start = high_watermarks(broker.bootstrap, TOPIC)

    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]
    api.post(f"/api/orders/{order_id}/cancel/")

    records = read_topic(broker.bootstrap, TOPIC, start=start, keys={str(order_id)}, until=lambda rs: len(rs) >= 2)
    assert [r.headers["eventType"] for r in records] == ["OrderCreated", "OrderCancelled"]
    for record in records:
        assert_matches_contract(record)
    wait_for(lambda: OutboxEvent.objects.filter(status="sent").count() == 2, timeout=10, message="both rows sent")


@pytest.mark.django_db(transaction=True)
def test_every_sent_row_records_the_partition_and_offset_its_message_got(broker):
    """A batch over every partition, its ids broken by a gap wider than one marking statement spans: each row
    still records its own message's position."""
    from relay.publish import POSITION_RUN_GAP
    from relay.services import relay_run
    from tests.relay.helpers import enqueue

    start = high_watermarks(broker.bootstrap, TOPIC)
    events = [enqueue(f"position-{n}", "OrderCreated") for n in range(120)]
    gap = events[40:40 + POSITION_RUN_GAP + 5]
    OutboxEvent.objects.filter(pk__in=[e.pk for e in gap]).delete()
    kept = {str(e.event_id) for e in events} - {str(e.event_id) for e in gap}

    assert relay_run(budget=5).sent == len(kept)

    keys = {e.aggregate_id for e in events}
    records = read_topic(broker.bootstrap, TOPIC, start=start, keys=keys, until=lambda rs: len(rs) >= len(kept))
    position = {r.headers["id"]: (r.partition, r.offset) for r in records}
    assert set(position) == kept
    assert len({p for p, _ in position.values()}) > 1
    rows = OutboxEvent.objects.filter(status="sent")
    assert {str(row.event_id): (row.kafka_partition, row.kafka_offset) for row in rows} == position


@pytest.mark.django_db
def test_extreme_partitions_and_offsets_are_stored_as_acknowledged():
    """Positions as wide as Kafka's types allow (int32 partitions, int64 offsets, negative sentinels) keep their
    fixed-width fields: a wider one would shift every later row's position in the statement."""
    from django.db import transaction
    from django.utils import timezone

    from relay import kafka
    from relay.claim import _claim
    from relay.publish import _mark_sent
    from tests.relay.helpers import enqueue

    extremes = [(2**31 - 1, 2**63 - 1), (0, -(2**63)), (-1, -1001), (123456, 0)]
    for n in range(len(extremes)):
        enqueue(f"extreme-{n}", "OrderCreated")
    with transaction.atomic():
        rows = _claim(now=timezone.now(), batch_size=10)
        _mark_sent([(row, kafka.Delivery(partition=p, offset=o)) for row, (p, o) in zip(rows, extremes)],
                   now=timezone.now())
    stored = dict(OutboxEvent.objects.values_list("id", "kafka_partition").order_by())
    offsets = dict(OutboxEvent.objects.values_list("id", "kafka_offset").order_by())
    assert [(stored[row.id], offsets[row.id]) for row in rows] == extremes
