from decimal import Decimal

from django.core.exceptions import ValidationError
from rest_framework import serializers

from .models import Order, OrderItem
from .services import ItemInput, order_total

MAX_ITEMS_PER_ORDER = 500
# The largest total the orders table can store (Order.total: max_digits=18, decimal_places=2).
_total_field = Order._meta.get_field("total")
MAX_ORDER_TOTAL = Decimal(10) ** (_total_field.max_digits - _total_field.decimal_places) - Decimal("0.01")


def text_is_encodable(value: str) -> None:
    # Lone surrogates survive JSON parsing but cannot be stored as utf8mb4.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode text.")


class ItemInputSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=64, validators=[text_is_encodable])
    quantity = serializers.IntegerField(min_value=1, max_value=1_000_000)
    unit_price = serializers.DecimalField(max_digits=10, decimal_places=2, min_value=0)


class OrderCreateSerializer(serializers.Serializer):
    customer_id = serializers.CharField(max_length=64, validators=[text_is_encodable])
    items = ItemInputSerializer(many=True, allow_empty=False, max_length=MAX_ITEMS_PER_ORDER)

    def validate(self, attrs):
        # Valid items can add up to more than the total column holds; the database would refuse it (500).
        if order_total(items=[ItemInput(**item) for item in attrs["items"]]) > MAX_ORDER_TOTAL:
            raise serializers.ValidationError({"items": [f"The order total may not exceed {MAX_ORDER_TOTAL}."]})
        return attrs


class OrderItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = OrderItem
        fields = ["sku", "quantity", "unit_price"]


class OrderSerializer(serializers.ModelSerializer):
    items = OrderItemSerializer(many=True, read_only=True)

    class Meta:
        model = Order
        fields = ["id", "customer_id", "status", "total", "items", "created_at", "updated_at"]
