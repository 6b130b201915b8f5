"""The claim: its plan (the claim index walked in id order, no filesort, rows in backoff skipped inside it),
and lanes of one process claiming around each other's batches."""

import pytest
from django.db import connection, transaction
from django.utils import timezone

from ops.db import db_datetime
from relay.claim import CLAIM_INDEX, _claim, claim_range_sql, claim_sql, first_due_sql, in_flight
from relay.ordering import split_by_aggregate_order
from tests.relay.helpers import enqueue


@pytest.mark.django_db
@pytest.mark.parametrize("skip_ranges", [[], [(1, 1000)], [(1, 10), (20, 30)]])
@pytest.mark.parametrize("statement, parameters, index", [
    (first_due_sql, ["now"], CLAIM_INDEX),
    (claim_range_sql, [1, 4000, "now", 1000], "PRIMARY"),
    (claim_sql, ["now", 4000, 1000], CLAIM_INDEX),
])
def test_each_claim_statement_walks_its_index_in_id_order_without_a_filesort(skip_ranges, statement, parameters, index):
    for n in range(20):
        enqueue(f"plan-{n}", "OrderCreated")
    now = db_datetime(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + statement(skip_ranges=skip_ranges), [now if p == "now" else p for p in parameters])
        columns = [c[0] for c in cursor.description]
        plan = [dict(zip(columns, row)) for row in cursor.fetchall()]
    assert len(plan) == 1
    assert plan[0]["key"] == index
    assert "filesort" not in (plan[0]["Extra"] or "")


@pytest.mark.django_db
def test_a_claim_takes_due_rows_in_id_order_within_its_span_and_past_it():
    """The span from the first due row is claimed by the primary key, passing over rows in backoff and rows
    already sent; with too few due rows in it, the claim goes on past it through the claim index."""
    from datetime import timedelta

    from outbox.models import OutboxEvent
    from relay.claim import CLAIM_SPAN_BATCHES

    batch_size = 5
    ids = [enqueue(f"span-{n}", "OrderCreated").pk for n in range(CLAIM_SPAN_BATCHES * batch_size + 10)]
    OutboxEvent.objects.filter(pk__in=ids[1:3]).update(available_at=timezone.now() + timedelta(hours=1))
    OutboxEvent.objects.filter(pk__in=ids[3:CLAIM_SPAN_BATCHES * batch_size + 5]).update(status="sent")
    with transaction.atomic():
        claimed = [row.id for row in _claim(now=timezone.now(), batch_size=batch_size)]
    beyond_span = ids[CLAIM_SPAN_BATCHES * batch_size + 5:]
    assert claimed == [ids[0], *beyond_span[:batch_size - 1]]
    assert beyond_span[0] > ids[0] + CLAIM_SPAN_BATCHES * batch_size  # really past the span


@pytest.mark.django_db
def test_rows_in_backoff_are_passed_over_inside_the_index():
    """During an outage every pending row is in backoff: a claim must not read (or lock) each of them. The first
    due row is looked for in the claim index alone, which holds available_at, and without one nothing is
    locked. (Rows in backoff inside the span after a due row are read by the primary key and passed over.)"""
    from datetime import timedelta

    from outbox.models import OutboxEvent

    for n in range(200):
        enqueue(f"backoff-{n}", "OrderCreated")
    OutboxEvent.objects.update(available_at=timezone.now() + timedelta(hours=1), attempts=1)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + first_due_sql(), [db_datetime(timezone.now())])
        columns = [c[0] for c in cursor.description]
        (plan,) = [dict(zip(columns, row)) for row in cursor.fetchall()]
        assert plan["key"] == CLAIM_INDEX and "Using index" in plan["Extra"].split("; ")  # the index alone
    with transaction.atomic():
        assert _claim(now=timezone.now(), batch_size=1000) == []


@pytest.mark.django_db(transaction=True)
def test_a_lane_claims_around_another_lanes_batch_and_holds_what_waits_on_it():
    """Two lanes of one process: the second claims past the first's batch and knows that batch's rows."""
    import threading

    first_created = enqueue("L-1", "OrderCreated")
    second_created = enqueue("L-2", "OrderCreated")
    later_cancel = enqueue("L-1", "OrderCancelled")
    claimed, second = threading.Event(), {}

    def lane_two():
        try:
            claimed.wait(10)
            with in_flight.claiming() as claim, transaction.atomic():
                rows, other_lanes = claim(now=timezone.now(), batch_size=10)
                second["rows"], second["other_lanes"] = [r.id for r in rows], [r.id for r in other_lanes]
                ready, held = split_by_aggregate_order(rows, other_lanes=other_lanes, now=timezone.now())
                second["held"] = [r.id for r in held]
        finally:
            connection.close()

    thread = threading.Thread(target=lane_two)
    thread.start()
    with in_flight.claiming() as claim, transaction.atomic():
        rows, other_lanes = claim(now=timezone.now(), batch_size=2)  # Created L-1, Created L-2
        assert other_lanes == []
        claimed.set()
        thread.join(20)
    assert [r.id for r in rows] == [first_created.id, second_created.id]
    assert second["other_lanes"] == [r.id for r in rows]
    assert second["rows"] == [later_cancel.id]
    assert second["held"] == [later_cancel.id]  # its order's Created is in the other lane's batch


@pytest.mark.django_db
@pytest.mark.parametrize("microsecond", [0, 7, 123456])
def test_the_claimed_time_is_the_rows_occurred_at_as_isoformat_writes_it(microsecond):
    """The claim reads occurred_at as text, not as a datetime: its RFC 3339 form must be what isoformat() gave,
    a zero fraction left out, as relay_cdc (which builds it from a datetime) writes it."""
    from datetime import datetime, timezone as dt_timezone

    from outbox.models import OutboxEvent
    from relay.claim import Claimed

    occurred = datetime(2026, 1, 2, 3, 4, 5, microsecond)
    OutboxEvent.objects.filter(pk=enqueue("time", "OrderCreated").pk).update(
        occurred_at=occurred.replace(tzinfo=dt_timezone.utc))
    with transaction.atomic():
        (row,) = _claim(now=timezone.now(), batch_size=10)
    expected = occurred.isoformat() + "+00:00"
    assert row.time == expected
    assert dict(row.header_items())["occurredAt"] == dict(row.header_items())["ce_time"] == expected
    assert row.occurred_at == occurred
    from_datetime = Claimed(id=1, event_id="e", aggregate_type="order", aggregate_id="1", event_type="T",
                            payload="{}", occurred_at=occurred, attempts=0)
    assert from_datetime.time == expected


@pytest.mark.django_db
def test_a_claimed_row_has_every_slot_the_constructor_sets():
    """The claim builds rows without the keyword call: a slot it forgot would fail here, not in production."""
    from relay.claim import Claimed

    enqueue("slots", "OrderCreated")
    with transaction.atomic():
        (row,) = _claim(now=timezone.now(), batch_size=10)
    built = Claimed(id=row.id, event_id=row.event_id, aggregate_type=row.aggregate_type, aggregate_id=row.aggregate_id,
                    event_type=row.event_type, payload=row.payload, occurred_at=row.occurred_at, attempts=row.attempts,
                    trace_parent=row.trace_parent, trace_state=row.trace_state, failing_since=row.failing_since)
    slots = Claimed.__slots__
    assert {slot: getattr(row, slot) for slot in slots} == {slot: getattr(built, slot) for slot in slots}
