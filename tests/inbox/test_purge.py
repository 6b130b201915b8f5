from datetime import timedelta

import pytest
from django.utils import timezone

from inbox.models import ProcessedEvent
from inbox.services import processed_events_purge

pytestmark = pytest.mark.django_db


def test_processed_event_ids_are_forgotten_only_after_the_retention_window(settings):
    settings.INBOX_RETENTION_DAYS = 30
    for i, age in enumerate([31, 40, 29, 0]):
        ProcessedEvent.objects.create(group_id="g", event_id=f"e{i}", event_type="OrderCreated", topic="t",
                                      partition=0, offset=i, processed_at=timezone.now() - timedelta(days=age))

    assert processed_events_purge(batch_size=1) == 2
    assert sorted(ProcessedEvent.objects.values_list("event_id", flat=True)) == ["e2", "e3"]
