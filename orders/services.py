import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, Callable

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from outbox.services import outbox_enqueue

from .models import IdempotencyKey, Order, OrderItem

AGGREGATE_TYPE = "order"


class OrderError(Exception):
    """A business rule refused the request; `status` is the HTTP status that says so."""

    status = 409

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class ItemInput:
    sku: str
    quantity: int
    unit_price: Decimal


def order_total(*, items: list[ItemInput]) -> Decimal:
    return sum((item.unit_price * item.quantity for item in items), Decimal("0.00")).quantize(Decimal("0.01"))


def _order_event_payload(order: Order) -> dict[str, Any]:
    return {"order_id": str(order.pk), "customer_id": order.customer_id, "total": str(order.total)}


@transaction.atomic
def order_create(*, owner, customer_id: str, items: list[ItemInput]) -> Order:
    """Write the order, its items and its OrderCreated event in one transaction."""
    order = Order.objects.create(owner=owner, customer_id=customer_id, total=order_total(items=items))
    rows = OrderItem.objects.bulk_create(
        OrderItem(order=order, sku=i.sku, quantity=i.quantity, unit_price=i.unit_price) for i in items
    )
    payload = _order_event_payload(order) | {
        "items": [{"sku": r.sku, "quantity": r.quantity, "unit_price": str(r.unit_price)} for r in rows],
    }
    outbox_enqueue(aggregate_type=AGGREGATE_TYPE, aggregate_id=order.pk, event_type="OrderCreated", payload=payload)
    return order


@transaction.atomic
def order_cancel(*, owner, order_id: int) -> Order:
    """Cancel an order and record OrderCancelled. The row lock serialises an order's events."""
    order = Order.objects.select_for_update().filter(owner=owner, pk=order_id).first()
    if order is None:
        raise OrderError(f"order {order_id} not found", status=404)
    if order.status == Order.Status.CANCELLED:
        raise OrderError(f"order {order_id} is already cancelled")
    order.status = Order.Status.CANCELLED
    order.save(update_fields=["status", "updated_at"])
    outbox_enqueue(
        aggregate_type=AGGREGATE_TYPE, aggregate_id=order.pk, event_type="OrderCancelled",
        payload=_order_event_payload(order),
    )
    return order


def request_fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def idempotent_call(
    *, owner, key: str, fingerprint: str, call: Callable[[], tuple[int, Any]]
) -> tuple[int, Any]:
    """Run `call` once per (owner, key); a repeat with the same request replays the first answer.

    The key is claimed in its own committed insert, so a concurrent repeat sees it in flight (409).
    The answer is stored in the same transaction as the work, so a stored answer means the work committed.
    A claim left behind by a dead process is taken over after IDEMPOTENCY_KEY_STALE_AFTER seconds.
    """
    if not key.strip() or len(key) > 255:
        raise OrderError("Idempotency-Key must be 1 to 255 characters", status=400)
    claim, stored_answer = _idempotency_claim(owner=owner, key=key, fingerprint=fingerprint)
    if stored_answer is not None:
        return stored_answer
    ours = IdempotencyKey.objects.filter(pk=claim.pk, created_at=claim.created_at, response_status__isnull=True)
    try:
        with transaction.atomic():
            status, body = call()
            if not ours.update(response_status=status, response_body=body):
                # A retry took the key over while this request was too slow: its answer wins, ours rolls back.
                raise OrderError("a request with this Idempotency-Key is still in flight", status=409)
        return status, body
    except BaseException:
        # The work did not commit: free the key so the client's retry runs it.
        ours.delete()
        raise


def _idempotency_claim(*, owner, key: str, fingerprint: str) -> tuple[IdempotencyKey | None, tuple[int, Any] | None]:
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(owner=owner, key=key, request_hash=fingerprint), None
    except IntegrityError:
        pass
    existing = IdempotencyKey.objects.get(owner=owner, key=key)
    if existing.request_hash != fingerprint:
        raise OrderError("Idempotency-Key was already used with a different request body", status=422)
    if existing.response_status is not None:
        return None, (existing.response_status, existing.response_body)
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.IDEMPOTENCY_KEY_STALE_AFTER)
    taken_over = existing.created_at < stale_before and IdempotencyKey.objects.filter(
        pk=existing.pk, response_status__isnull=True, created_at=existing.created_at
    ).update(created_at=now)
    if taken_over:
        existing.created_at = now
        return existing, None
    raise OrderError("a request with this Idempotency-Key is still in flight", status=409)
