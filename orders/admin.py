from django.contrib import admin

from outbox.admin import ReadOnlyAdmin

from .models import Order, OrderItem


class OrderItemInline(admin.TabularInline):
    model = OrderItem
    extra = 0
    can_delete = False

    def has_change_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    list_display = ["id", "customer_id", "status", "total", "owner", "created_at"]
    list_filter = ["status"]
    search_fields = ["=id", "=customer_id"]
    inlines = [OrderItemInline]
