from django.contrib import admin

from outbox.admin import ReadOnlyAdmin

from .models import CustomerStats


@admin.register(CustomerStats)
class CustomerStatsAdmin(ReadOnlyAdmin):
    list_display = ["customer_id", "orders_created", "orders_cancelled", "total_spent", "updated_at"]
    search_fields = ["=customer_id"]
