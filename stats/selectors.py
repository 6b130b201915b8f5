from decimal import Decimal

from .models import CustomerStats


def customer_stats_get(*, customer_id: str) -> dict:
    stats = CustomerStats.objects.filter(customer_id=customer_id).first()
    if stats is None:
        return {"customer_id": customer_id, "orders_created": 0, "orders_cancelled": 0, "total_spent": "0.00"}
    return {
        "customer_id": stats.customer_id,
        "orders_created": stats.orders_created,
        "orders_cancelled": stats.orders_cancelled,
        "total_spent": str(stats.total_spent.quantize(Decimal("0.01"))),
    }
