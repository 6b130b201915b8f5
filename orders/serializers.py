from django.core.exceptions import ValidationError
from rest_framework import serializers

from .models import Order, OrderItem

MAX_ITEMS_PER_ORDER = 500


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


class OrderItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = OrderItem
        fields = ["sku", "quantity", "unit_price"]


class OrderSerializer(serializers.ModelSerializer):
    items = OrderItemSerializer(many=True, read_only=True)

    class Meta:
        model = Order
        fields = ["id", "customer_id", "status", "total", "items", "created_at", "updated_at"]
