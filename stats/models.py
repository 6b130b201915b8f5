from decimal import Decimal

from django.db import models


class CustomerStats(models.Model):
    """Per-customer figures built only from order events, never from the orders table."""

    customer_id = models.CharField(max_length=64, primary_key=True, db_collation="utf8mb4_bin")
    orders_created = models.PositiveIntegerField(default=0)
    orders_cancelled = models.PositiveIntegerField(default=0)
    total_spent = models.DecimalField(max_digits=20, decimal_places=2, default=Decimal("0.00"))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "customer stats"

    def __str__(self) -> str:
        return self.customer_id
