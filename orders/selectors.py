from django.db.models import QuerySet

from .models import Order


def order_list(*, owner, customer_id: str | None = None) -> QuerySet[Order]:
    orders = Order.objects.filter(owner=owner).prefetch_related("items").order_by("-id")
    if customer_id is not None:
        orders = orders.filter(customer_id=customer_id)
    return orders


def order_get(*, owner, order_id: int) -> Order | None:
    return Order.objects.filter(owner=owner, pk=order_id).prefetch_related("items").first()
