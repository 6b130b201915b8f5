"""The inbox's public surface: what the consumer, its commands, the admin, the tasks and handlers call.

The code lives by concern in the other modules of this package (README.md, "Code layout").
"""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from ops.db import delete_in_batches

from .apply import inbound_events_apply
from .dead_letters import dead_letter_find, dead_letter_record, dead_letters_replay
from .messages import InboundEvent, PoisonMessage, RawMessage, inbound_event_parse
from .models import ProcessedEvent

__all__ = ["InboundEvent", "PoisonMessage", "RawMessage", "dead_letter_find", "dead_letter_record",
           "dead_letters_replay", "inbound_event_parse", "inbound_events_apply", "processed_events_purge"]


def processed_events_purge(*, older_than: timedelta | None = None, batch_size: int = 1000) -> int:
    """Forget processed-event ids older than INBOX_RETENTION_DAYS, in small committed batches.

    Keep the window longer than any redelivery can take (topic retention, consumer lag, DLQ replays):
    an id forgotten too early lets a late duplicate apply twice.
    """
    older_than = older_than if older_than is not None else timedelta(days=settings.INBOX_RETENTION_DAYS)
    cutoff = timezone.now() - older_than
    return delete_in_batches(ProcessedEvent.objects.filter(processed_at__lt=cutoff), batch_size=batch_size)
