import json

from django.core.exceptions import PermissionDenied

from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from ops.services import consumer_progress, readiness_checks

from .models import FailedEvent, OutboxEvent
from .selectors import outbox_overview
from .services import RequeueRefused, failed_event_requeue


class ReadOnlyAdmin(admin.ModelAdmin):
    """Events are facts: the admin shows them and offers actions, it never edits them."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_requeue_permission(self, request):
        return request.user.has_perm("outbox.requeue_failedevent")

    @admin.display(description="payload")
    def payload_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True))

    @admin.display(description="order", ordering="aggregate_id")
    def aggregate_link(self, obj):
        """The aggregate id, linked to its order's admin page."""
        if obj.aggregate_type == "order":
            try:
                return format_html('<a href="{}">{}</a>', reverse("admin:orders_order_change", args=[obj.aggregate_id]),
                                   obj.aggregate_id)
            except NoReverseMatch:  # not an order id (a test's or another service's aggregate)
                pass
        return f"{obj.aggregate_type}:{obj.aggregate_id}"

    def _report_requeued(self, request, requeue):
        try:
            count = requeue()
        except RequeueRefused as exc:
            self.message_user(request, f"Nothing requeued: {exc}", messages.ERROR)
            return
        self.message_user(request, f"Requeued {count} event(s).", messages.SUCCESS if count else messages.WARNING)


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdmin):
    list_display = ["id", "event_type", "aggregate_link", "status", "attempts", "available_at", "failing_since",
                    "created_age", "published_at", "kafka_position"]
    list_filter = ["status", "event_type", "aggregate_type"]
    search_fields = ["=event_id", "=aggregate_id"]
    readonly_fields = ["payload_pretty"]
    exclude = ["payload"]
    actions = ["requeue"]
    show_full_result_count = False

    def get_urls(self):
        overview = self.admin_site.admin_view(self.overview_view)
        return [path("overview/", overview, name="outbox_overview"), *super().get_urls()]

    def overview_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "title": "Outbox overview", "overview": outbox_overview(),
                   "checks": readiness_checks(), "consumers": consumer_progress(lag=True)}
        return TemplateResponse(request, "admin/outbox/overview.html", context)

    @admin.display(description="age")
    def created_age(self, obj):
        return timezone.now() - obj.occurred_at

    @admin.action(description="Requeue selected dead events", permissions=["requeue"])
    def requeue(self, request, queryset):
        failed = FailedEvent.objects.filter(outbox_event__in=queryset.filter(status=OutboxEvent.Status.DEAD))
        self._report_requeued(request, lambda: failed_event_requeue(failed_events=failed, user=request.user))


@admin.register(FailedEvent)
class FailedEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "event_type", "aggregate_link", "status", "attempts", "short_error", "age",
                    "dlq_attempts", "requeued_by", "requeued_at"]
    list_filter = ["status", "event_type"]
    search_fields = ["=event_id", "=aggregate_id"]
    readonly_fields = ["payload_pretty", "headers_pretty"]
    exclude = ["payload", "headers"]
    actions = ["requeue"]

    @admin.display(description="error")
    def short_error(self, obj):
        return obj.error[:120]

    @admin.display(description="age", ordering="failed_at")
    def age(self, obj):
        return timezone.now() - obj.failed_at

    @admin.display(description="headers")
    def headers_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.headers, indent=2, sort_keys=True))

    @admin.action(description="Requeue selected failed events", permissions=["requeue"])
    def requeue(self, request, queryset):
        self._report_requeued(request, lambda: failed_event_requeue(failed_events=queryset, user=request.user))
