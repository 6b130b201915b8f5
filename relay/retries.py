"""A retriable publish failure: the row stays pending, out of the claims until its backoff has passed."""

import logging
import random
from datetime import datetime, timedelta

from django.conf import settings

from ops import metrics
from outbox.models import OutboxEvent

from . import kafka
from .claim import Claimed

logger = logging.getLogger(__name__)


def backoff_delay(attempts: int) -> float:
    """Exponential backoff with equal jitter: half the delay fixed, half random."""
    delay = min(settings.OUTBOX_BACKOFF_MAX, settings.OUTBOX_BACKOFF_BASE * 2 ** max(attempts - 1, 0))
    return delay / 2 + random.uniform(0, delay / 2)


def schedule_retries(failed: list[tuple[Claimed, kafka.Delivery]], *, now: datetime) -> None:
    metrics.OUTBOX_RETRIED.inc(len(failed))
    for row, delivery in failed:
        attempts = row.attempts + 1
        delay = backoff_delay(attempts)
        OutboxEvent.objects.filter(id=row.id).update(
            attempts=attempts, available_at=now + timedelta(seconds=delay), last_error=delivery.error
        )
        logger.info("publish failed, retrying in %.1fs: %s", delay, delivery.error, extra=row.log_context(attempts))
