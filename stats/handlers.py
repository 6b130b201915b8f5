"""Projection of order events into per-customer stats. Runs inside the inbox's transaction."""

from decimal import Decimal

from django.db.models import F

from inbox.registry import handles

from .models import CustomerStats


def _stats_for_update(customer_id: str) -> None:
    CustomerStats.objects.get_or_create(customer_id=customer_id)


@handles("OrderCreated")
def order_created(payload: dict, headers: dict) -> None:
    _stats_for_update(payload["customer_id"])
    CustomerStats.objects.filter(customer_id=payload["customer_id"]).update(
        orders_created=F("orders_created") + 1, total_spent=F("total_spent") + Decimal(payload["total"])
    )


@handles("OrderCancelled")
def order_cancelled(payload: dict, headers: dict) -> None:
    _stats_for_update(payload["customer_id"])
    CustomerStats.objects.filter(customer_id=payload["customer_id"]).update(
        orders_cancelled=F("orders_cancelled") + 1, total_spent=F("total_spent") - Decimal(payload["total"])
    )
