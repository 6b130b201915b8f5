"""OpenAPI description of the stats API (drf-spectacular). Documentation only."""

from rest_framework import serializers


class CustomerStatsSerializer(serializers.Serializer):
    customer_id = serializers.CharField()
    orders_created = serializers.IntegerField(min_value=0)
    orders_cancelled = serializers.IntegerField(min_value=0)
    total_spent = serializers.DecimalField(max_digits=20, decimal_places=2)
