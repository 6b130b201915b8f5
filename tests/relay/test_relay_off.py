"""OUTBOX_RELAY_ENABLED=0 turns the Celery relay off completely: one publisher at a time (relay_cdc's README)."""

import os
import subprocess
import sys

import pytest

from outbox.models import OutboxEvent
from relay import services, tasks
from tests.cdc_tools import PROJECT
from tests.processes import suite_env
from tests.relay.helpers import enqueue


@pytest.mark.django_db
def test_the_tasks_publish_nothing_and_sweep_nothing(settings, monkeypatch):
    settings.OUTBOX_RELAY_ENABLED = False
    called = []
    for name in ("relay_run", "relay_follow", "dead_letters_retry"):
        monkeypatch.setattr(services, name, lambda *a, name=name, **k: called.append(name))
    enqueue("off-1", "OrderCreated")
    tasks.relay_outbox()
    tasks.relay_outbox(woken=True)
    tasks.retry_dead_letters()
    assert called == []
    assert OutboxEvent.objects.get(aggregate_id="off-1").status == OutboxEvent.Status.PENDING


def test_beat_schedules_no_relay_task():
    code = "from django.conf import settings; print(sorted(t['task'] for t in settings.CELERY_BEAT_SCHEDULE.values()))"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    on = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {code}"], cwd=PROJECT, env=env,
                        capture_output=True, text=True, check=True).stdout
    off = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {code}"], cwd=PROJECT,
                         env={**env, "OUTBOX_RELAY_ENABLED": "0"}, capture_output=True, text=True, check=True).stdout
    assert "relay.tasks.relay_outbox" in on and "relay.tasks.retry_dead_letters" in on
    assert "relay.tasks" not in off and "outbox.tasks.purge_sent_events" in off


@pytest.mark.django_db(transaction=True)
def test_relay_outbox_refuses_to_publish(broker):
    enqueue("off-2", "OrderCreated")
    result = subprocess.run([sys.executable, "manage.py", "relay_outbox"], cwd=PROJECT, capture_output=True,
                            text=True, env=suite_env(broker, OUTBOX_RELAY_ENABLED="0"))
    assert result.returncode == 1 and "OUTBOX_RELAY_ENABLED=0" in result.stderr
    assert OutboxEvent.objects.get(aggregate_id="off-2").status == OutboxEvent.Status.PENDING


@pytest.mark.django_db
def test_a_requeue_is_refused_not_left_pending_forever(settings, client, django_user_model):
    """relay_cdc publishes inserted rows only: a failed event turned back to pending would never go out."""
    from django.core.management import CommandError, call_command

    from outbox.models import FailedEvent

    settings.OUTBOX_RELAY_ENABLED = False
    event = enqueue("off-2", "OrderCreated")
    OutboxEvent.objects.filter(pk=event.pk).update(status=OutboxEvent.Status.DEAD)
    failed = FailedEvent.objects.create(
        outbox_event_id=event.pk, event_id=event.event_id, aggregate_type="order", aggregate_id="off-2",
        event_type="OrderCreated", topic="outbox.event.order", payload={}, headers={}, error="refused",
        attempts=1, status=FailedEvent.Status.DEAD_LETTERED,
    )
    operator = django_user_model.objects.create_superuser("operator", "op@example.com", "pw")
    with pytest.raises(CommandError, match="OUTBOX_RELAY_ENABLED=0"):
        call_command("requeue_failed_events", "--all", "--user", "operator")
    client.force_login(operator)
    response = client.post("/admin/outbox/failedevent/", {"action": "requeue", "_selected_action": [failed.pk]},
                           follow=True)
    assert "Nothing requeued" in response.content.decode()
    failed.refresh_from_db()
    assert failed.status == FailedEvent.Status.DEAD_LETTERED
    assert OutboxEvent.objects.get(pk=event.pk).status == OutboxEvent.Status.DEAD


@pytest.mark.django_db(transaction=True)  # the collector closes an unusable connection, as at a real scrape
def test_the_pending_gauges_are_not_exported_when_relay_cdc_publishes(settings):
    """Under relay_cdc rows stay pending by design: their age would alert forever (OutboxEventsPendingTooLong)."""
    from ops.collectors import DatabaseStateCollector

    enqueue("off-3", "OrderCreated")
    names = {family.name for family in DatabaseStateCollector().collect()}
    assert {"outbox_events_pending", "outbox_oldest_pending_age_seconds"} <= names
    settings.OUTBOX_RELAY_ENABLED = False
    names = {family.name for family in DatabaseStateCollector().collect()}
    assert not names & {"outbox_events_pending", "outbox_oldest_pending_age_seconds", "outbox_events_retrying",
                        "outbox_longest_failing_seconds"}
    assert "outbox_failed_events" in names
