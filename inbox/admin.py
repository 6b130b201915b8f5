from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from outbox.admin import ReadOnlyAdmin

from .models import ConsumerDeadLetter, ProcessedEvent
from .services import dead_letters_replay


@admin.register(ProcessedEvent)
class ProcessedEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "event_type", "group_id", "topic", "partition", "offset", "processed_at"]
    list_filter = ["group_id", "event_type"]
    search_fields = ["=event_id"]
    show_full_result_count = False


@admin.register(ConsumerDeadLetter)
class ConsumerDeadLetterAdmin(ReadOnlyAdmin):
    list_display = ["topic", "partition", "offset", "event_link", "short_error", "attempts", "dlq_published",
                    "created_at", "replay_outcome", "replayed_by", "replayed_at"]
    list_filter = ["group_id", "dlq_published", "replay_outcome"]
    search_fields = ["=event_id"]
    actions = ["replay"]

    @admin.display(description="event", ordering="event_id")
    def event_link(self, obj):
        """The event id, linked to the outbox's rows of that event (when this service published it)."""
        if not obj.event_id:
            return "-"
        url = reverse("admin:outbox_outboxevent_changelist")
        return format_html('<a href="{}?q={}">{}</a>', url, obj.event_id, obj.event_id)

    @admin.display(description="error")
    def short_error(self, obj):
        return obj.error[:120]

    def has_replay_permission(self, request):
        return request.user.has_perm("inbox.replay_consumerdeadletter")

    @admin.action(description="Replay selected dead letters through their handler", permissions=["replay"])
    def replay(self, request, queryset):
        result = dead_letters_replay(dead_letters=queryset, user=request.user)
        self.message_user(
            request, f"Replayed: {result.applied} applied, {result.already_applied} already applied (skipped), "
                     f"{result.failed} failed again.", messages.WARNING if result.failed else messages.SUCCESS)
