from django.db.models import Count, Min
from django.utils import timezone

from .models import FailedEvent, OutboxEvent


def failed_event_counts() -> dict[str, int]:
    """Failed events per status (statuses with none are absent)."""
    return dict(FailedEvent.objects.values_list("status").annotate(n=Count("id")))


def outbox_overview(*, recent: int = 20, held_limit: int = 50) -> dict:
    """What an operator needs at a glance: counts, the oldest pending event, what is blocked, what failed."""
    counts = dict(OutboxEvent.objects.values_list("status").annotate(n=Count("id")))
    oldest = OutboxEvent.objects.filter(status=OutboxEvent.Status.PENDING).aggregate(t=Min("occurred_at"))["t"]
    failing = (
        OutboxEvent.objects.filter(status=OutboxEvent.Status.PENDING, attempts__gt=0)
        .order_by("id")
        .values("aggregate_type", "aggregate_id", "id", "event_type", "attempts", "last_error", "available_at")[:held_limit]
    )
    held = []
    for head in failing:
        behind = OutboxEvent.objects.filter(
            status=OutboxEvent.Status.PENDING, aggregate_type=head["aggregate_type"],
            aggregate_id=head["aggregate_id"], id__gt=head["id"],
        ).count()
        held.append({**head, "events_behind": behind})
    return {
        "counts": {status: counts.get(status, 0) for status in OutboxEvent.Status.values},
        "failed_counts": failed_event_counts(),
        "oldest_pending_age": timezone.now() - oldest if oldest else None,
        "held": held,
        "recent_failures": FailedEvent.objects.order_by("-failed_at")[:recent],
    }
