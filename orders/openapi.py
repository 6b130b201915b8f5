"""OpenAPI description of the orders API (drf-spectacular). Documentation only: no view uses these to validate."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from .serializers import OrderSerializer


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong.")


class OrderPageSerializer(serializers.Serializer):
    count = serializers.IntegerField(min_value=0)
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = OrderSerializer(many=True)


IDEMPOTENCY_KEY = OpenApiParameter(
    name="Idempotency-Key",
    type=str,
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "1 to 255 characters, per user. A repeat with the same key and body returns the first answer and "
        "creates nothing; the same key with a different body is 422; while the first request is in flight, 409."
    ),
)

ORDER_ID = OpenApiParameter(
    name="order_id", type={"type": "integer", "minimum": 1}, location=OpenApiParameter.PATH, description="The order's id."
)

BAD_REQUEST = OpenApiResponse(
    OpenApiTypes.OBJECT,
    description="Invalid input: a JSON object naming each bad field (item errors keyed by the item's index).",
)
UNAUTHORIZED = OpenApiResponse(ErrorSerializer, description="Missing or invalid `Authorization: Token <key>`.")
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such order for this user (or no such page).")
CONFLICT = OpenApiResponse(ErrorSerializer, description="Refused in the current state.")
UNPROCESSABLE = OpenApiResponse(ErrorSerializer, description="Idempotency-Key already used with a different body.")
