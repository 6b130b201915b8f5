"""Outbox and inbox state read from the database at scrape time."""

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from inbox.models import ConsumerDeadLetter
from outbox.models import FailedEvent, OutboxEvent
from outbox.selectors import failed_event_counts


class DatabaseStateCollector:
    def _pending(self):
        pending = OutboxEvent.objects.filter(status=OutboxEvent.Status.PENDING).aggregate(
            count=Count("id"), oldest=Min("occurred_at"), retrying=Count("failing_since"),
            failing_since=Min("failing_since"),
        )
        now = timezone.now()
        yield GaugeMetricFamily("outbox_events_pending", "Outbox events not yet published", value=pending["count"])
        age = (now - pending["oldest"]).total_seconds() if pending["oldest"] else 0.0
        yield GaugeMetricFamily("outbox_oldest_pending_age_seconds", "Age of the oldest pending event", value=age)
        # An outage shows here: pending events whose publishes keep failing retriably, and for how long.
        yield GaugeMetricFamily("outbox_events_retrying", "Pending events whose publishes have failed retriably",
                                value=pending["retrying"])
        failing = (now - pending["failing_since"]).total_seconds() if pending["failing_since"] else 0.0
        yield GaugeMetricFamily("outbox_longest_failing_seconds",
                                "How long the pending event failing longest has been failing (OUTBOX_GIVE_UP_AFTER "
                                "gives it up)", value=failing)

    def collect(self):
        if settings.OUTBOX_RELAY_ENABLED:
            # With the Celery relay off, relay_cdc publishes from the binlog and never marks rows sent: every row
            # stays pending until the purge, and these gauges would say nothing but its age (and alert forever).
            yield from self._pending()
        failed = GaugeMetricFamily("outbox_failed_events", "Failed events by status", labels=["status"])
        counts = failed_event_counts()
        for status in FailedEvent.Status.values:
            failed.add_metric([status], counts.get(status, 0))
        yield failed
        yield GaugeMetricFamily("inbox_dead_letters", "Messages the consumer dead-lettered (stored)",
                                value=ConsumerDeadLetter.objects.count())
        connection.close_if_unusable_or_obsolete()
