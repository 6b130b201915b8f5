"""Projection of order events into per-customer stats. Runs inside the inbox's transaction.

A batch of events is folded into one change per customer, written by one multi-row upsert: a batch of 500
events costs one statement, not a read and an update per event.
"""

from collections import defaultdict
from decimal import Decimal

from django.db import connection
from django.utils import timezone

from inbox.registry import handles_batch
from inbox.services import InboundEvent
from ops.db import db_datetime, sql_literals

from .models import CustomerStats

ZERO = Decimal("0")

_TABLE = connection.ops.quote_name(CustomerStats._meta.db_table)
_UPSERT = (
    f"INSERT INTO {_TABLE} (customer_id, orders_created, orders_cancelled, total_spent, updated_at) VALUES {{values}} "
    "ON DUPLICATE KEY UPDATE orders_created = orders_created + VALUES(orders_created), "
    "orders_cancelled = orders_cancelled + VALUES(orders_cancelled), "
    "total_spent = total_spent + VALUES(total_spent), updated_at = VALUES(updated_at)"
)


@handles_batch("OrderCreated", "OrderCancelled")
def project_order_events(events: list[InboundEvent]) -> None:
    changes: dict[str, list] = defaultdict(lambda: [0, 0, ZERO])  # created, cancelled, total_spent
    for event in events:
        change = changes[event.payload["customer_id"]]
        if event.event_type == "OrderCreated":
            change[0] += 1
            change[2] += Decimal(event.payload["total"])
        else:
            change[1] += 1
            change[2] -= Decimal(event.payload["total"])
    literal = sql_literals()
    with connection.cursor() as cursor:
        cursor.execute(stats_upsert_sql(literal, changes, now=literal(db_datetime(timezone.now()))))


def stats_upsert_sql(literal, changes: dict[str, list], *, now: str) -> str:
    """The one statement that applies per-customer changes (customer id -> [created, cancelled, total spent]).

    In key order, so that consumers of other partitions upserting the same customers lock them in one order.
    Values written into the statement (see inbox.apply): the customer id escaped by the driver, the counts
    as integers, the amount as a quoted plain decimal (never an exponent, never a float).
    """
    return _UPSERT.format(values=", ".join(
        f"({literal(customer)}, {int(created)}, {int(cancelled)}, '{spent:f}', {now})"
        for customer, (created, cancelled, spent) in sorted(changes.items())
    ))
