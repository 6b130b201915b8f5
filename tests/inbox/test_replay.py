"""Replaying consumer dead letters (admin action and command): through the handler, in the dedupe transaction,
safe to repeat, recorded, gated by a permission. The dead letters are made for real by the consumer."""

import uuid
from decimal import Decimal

import pytest
from django.core.management import call_command

from inbox.models import ConsumerDeadLetter, ProcessedEvent
from stats.models import CustomerStats
from tests.inbox.test_consumer import consume, created, event_headers, produce
from tests.outbox.test_admin import staff_client
from tests.testhandlers import handlers as test_handlers

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def topics(broker):
    names = [f"test-replay-{uuid.uuid4().hex[:8]}", f"test-replay-dlq-{uuid.uuid4().hex[:8]}"]
    for name in names:
        broker.create_topics(name, partitions=1)
    return names


@pytest.fixture
def dead_letter(broker, topics, monkeypatch):
    """A TestFlaky event whose handler failed every attempt, dead-lettered by a real consumer."""
    topic, dlq = topics
    monkeypatch.setitem(test_handlers.fail_times, "TestFlaky", 100)
    monkeypatch.setitem(test_handlers.calls, "TestFlaky", 0)
    headers = event_headers(event_type="TestFlaky")
    produce(broker.bootstrap, topic, value=created(customer="c-replay", total="7.50"), headers=headers)
    consumer = consume(topic, dlq, expect=1, max_attempts=2)
    assert consumer.stats["dead_lettered"] == 1
    record = ConsumerDeadLetter.objects.get()
    assert record.event_id == headers["id"] and not CustomerStats.objects.filter(customer_id="c-replay").exists()
    monkeypatch.setitem(test_handlers.fail_times, "TestFlaky", 0)  # the handler is fixed
    return record


def test_replay_from_the_admin_applies_it_once_and_a_second_replay_skips_it(dead_letter, django_user_model):
    operator, client = staff_client(django_user_model, "ops", "view_consumerdeadletter", "replay_consumerdeadletter")
    listing = client.get("/admin/inbox/consumerdeadletter/").content.decode()
    assert 'value="replay"' in listing

    for expected in ("applied", "already applied"):
        response = client.post("/admin/inbox/consumerdeadletter/", {"action": "replay", "_selected_action": [dead_letter.pk]})
        assert response.status_code == 302
        dead_letter.refresh_from_db()
        assert dead_letter.replay_outcome == expected
        assert dead_letter.replayed_by == operator and dead_letter.replayed_at is not None
        stats = CustomerStats.objects.get(customer_id="c-replay")
        assert (stats.orders_created, stats.total_spent) == (1, Decimal("7.50"))  # applied once, whatever the replays
    assert ProcessedEvent.objects.filter(event_id=dead_letter.event_id, group_id=dead_letter.group_id).count() == 1


def test_a_replay_that_fails_again_stays_a_dead_letter_with_the_new_error(dead_letter, monkeypatch, django_user_model):
    monkeypatch.setitem(test_handlers.fail_times, "TestFlaky", 100)  # still broken
    monkeypatch.setitem(test_handlers.calls, "TestFlaky", 0)
    operator = django_user_model.objects.create_user(username="ops")
    attempts = dead_letter.attempts

    call_command("replay_dead_letters", str(dead_letter.pk), "--user", "ops")

    dead_letter.refresh_from_db()
    assert dead_letter.replay_outcome == "failed" and dead_letter.attempts == attempts + 1
    assert dead_letter.error.startswith("replay failed: RuntimeError('transient failure")
    assert dead_letter.replayed_by == operator
    assert not ProcessedEvent.objects.filter(event_id=dead_letter.event_id).exists()  # rolled back with the handler
    assert not CustomerStats.objects.filter(customer_id="c-replay").exists()


def test_staff_without_the_permission_cannot_replay(dead_letter, django_user_model):
    _, client = staff_client(django_user_model, "viewer", "view_consumerdeadletter")
    assert 'value="replay"' not in client.get("/admin/inbox/consumerdeadletter/").content.decode()
    client.post("/admin/inbox/consumerdeadletter/", {"action": "replay", "_selected_action": [dead_letter.pk]})
    dead_letter.refresh_from_db()
    assert dead_letter.replay_outcome == "" and dead_letter.replayed_by is None
    assert not CustomerStats.objects.filter(customer_id="c-replay").exists()


def test_the_command_replays_every_dead_letter_not_applied_yet(dead_letter, django_user_model):
    django_user_model.objects.create_user(username="ops")
    call_command("replay_dead_letters", "--all", "--user", "ops")
    dead_letter.refresh_from_db()
    assert dead_letter.replay_outcome == "applied"
    assert CustomerStats.objects.get(customer_id="c-replay").orders_created == 1
