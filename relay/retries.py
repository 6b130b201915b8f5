"""A failed publish that is not the event's fault: the row stays pending, out of the claims until its backoff has
passed, for as long as the failure lasts (up to OUTBOX_GIVE_UP_AFTER); then it is given up (dead-lettered)."""

import logging
import random
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F
from django.db.models.functions import Coalesce

from ops import metrics
from outbox.models import OutboxEvent

from . import kafka
from .claim import Claimed

logger = logging.getLogger(__name__)


def backoff_delay(attempts: int) -> float:
    """Exponential backoff with equal jitter: half the delay fixed, half random."""
    delay = min(settings.OUTBOX_BACKOFF_MAX, settings.OUTBOX_BACKOFF_BASE * 2 ** min(max(attempts - 1, 0), 32))
    return delay / 2 + random.uniform(0, delay / 2)


def given_up(row: Claimed, delivery: kafka.Delivery, *, now: datetime) -> bool:
    """Whether a failed publish ends the event's retries: a refusal for good always; a retriable failure once the
    event has failed OUTBOX_MAX_ATTEMPTS times and has kept failing for OUTBOX_GIVE_UP_AFTER seconds."""
    if not delivery.retriable:
        return True
    if not delivery.costs_attempt or row.attempts + 1 < settings.OUTBOX_MAX_ATTEMPTS:
        return False
    failing_since = row.failing_since or now.replace(tzinfo=None)
    return (now.replace(tzinfo=None) - failing_since).total_seconds() >= settings.OUTBOX_GIVE_UP_AFTER


def schedule_retries(failed: list[tuple[Claimed, kafka.Delivery]], *, now: datetime) -> None:
    """Retriable failures: one attempt more, then backoff. The producer's own failures (a fatal error, a purge)
    cost no attempt: the rows go again once the rebuilt producer is up, after the first backoff step."""
    charged = [(row, d) for row, d in failed if d.costs_attempt]
    free = [(row, d) for row, d in failed if not d.costs_attempt]
    metrics.OUTBOX_RETRIED.inc(len(failed))
    for row, delivery in charged:
        attempts = row.attempts + 1
        delay = backoff_delay(attempts)
        OutboxEvent.objects.filter(id=row.id).update(
            attempts=attempts, available_at=now + timedelta(seconds=delay), last_error=delivery.error,
            failing_since=Coalesce(F("failing_since"), now),
        )
        logger.info("publish failed, retrying in %.1fs: %s", delay, delivery.error, extra=row.log_context(attempts))
    if free:
        # Longer while producers keep failing fatally one after the other (a cluster that keeps fencing them).
        delay = backoff_delay(max(1, kafka.producer.fatal_streak))
        OutboxEvent.objects.filter(id__in=[row.id for row, _ in free]).update(
            available_at=now + timedelta(seconds=delay), last_error=free[0][1].error,
            failing_since=Coalesce(F("failing_since"), now),  # shows in the outage gauges; charges nothing
        )
        logger.warning("%d event(s) not published because the producer failed; again in %.1fs (no attempt "
                       "counted): %s", len(free), delay, free[0][1].error)
