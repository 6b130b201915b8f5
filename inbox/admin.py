from django.contrib import admin

from outbox.admin import ReadOnlyAdmin

from .models import ConsumerDeadLetter, ProcessedEvent


@admin.register(ProcessedEvent)
class ProcessedEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "event_type", "group_id", "topic", "partition", "offset", "processed_at"]
    list_filter = ["group_id", "event_type"]
    search_fields = ["=event_id"]
    show_full_result_count = False


@admin.register(ConsumerDeadLetter)
class ConsumerDeadLetterAdmin(ReadOnlyAdmin):
    list_display = ["topic", "partition", "offset", "event_id", "error", "attempts", "dlq_published", "created_at"]
    list_filter = ["group_id", "dlq_published"]
    search_fields = ["=event_id"]
