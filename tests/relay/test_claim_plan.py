"""The claim's plan: the claim index walked in id order (no filesort), rows in backoff skipped inside it."""

import pytest
from django.db import connection
from django.utils import timezone

from ops.db import db_datetime
from relay.services import CLAIM_INDEX, claim_sql
from tests.relay.test_ordering import enqueue


@pytest.mark.django_db
@pytest.mark.parametrize("skip_ranges", [[], [(1, 1000)], [(1, 10), (20, 30)]])
def test_the_claim_walks_the_claim_index_without_a_filesort(skip_ranges):
    for n in range(20):
        enqueue(f"plan-{n}", "OrderCreated")
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + claim_sql(skip_ranges=skip_ranges),
                       [db_datetime(timezone.now()), 1000])
        columns = [c[0] for c in cursor.description]
        plan = [dict(zip(columns, row)) for row in cursor.fetchall()]
    assert len(plan) == 1
    assert plan[0]["key"] == CLAIM_INDEX
    assert "filesort" not in (plan[0]["Extra"] or "")


@pytest.mark.django_db
def test_rows_in_backoff_are_passed_over_inside_the_index():
    """During an outage every pending row is in backoff: a claim must not read (or lock) each of them."""
    from datetime import timedelta

    from django.db import transaction

    from outbox.models import OutboxEvent
    from relay.services import _claim

    for n in range(200):
        enqueue(f"backoff-{n}", "OrderCreated")
    OutboxEvent.objects.update(available_at=timezone.now() + timedelta(hours=1), attempts=1)
    with connection.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Handler_icp_%'")
        before = dict(cursor.fetchall())
        if not before:
            pytest.skip("index condition counters are MariaDB's")
        with transaction.atomic():
            assert _claim(now=timezone.now(), batch_size=1000) == []
        cursor.execute("SHOW SESSION STATUS LIKE 'Handler_icp_%'")
        after = dict(cursor.fetchall())
    attempts = int(after["Handler_icp_attempts"]) - int(before["Handler_icp_attempts"])
    matches = int(after["Handler_icp_match"]) - int(before["Handler_icp_match"])
    assert attempts >= 200 and matches == 0  # every row in backoff rejected by the index condition
