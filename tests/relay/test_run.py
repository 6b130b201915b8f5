"""A relay run: a batch that InnoDB picks as a deadlock victim runs again."""

import pytest
from django.db import OperationalError

from outbox.models import OutboxEvent
from relay import claim
from relay.services import relay_run
from tests.relay.helpers import enqueue


@pytest.mark.django_db
def test_a_batch_chosen_as_deadlock_victim_runs_again(producer, monkeypatch):
    enqueue("1", "OrderCreated")
    real_claim = claim._claim
    calls = []

    def claim_losing_a_deadlock_once(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")
        return real_claim(**kwargs)

    monkeypatch.setattr(claim, "_claim", claim_losing_a_deadlock_once)
    assert relay_run(budget=1).sent == 1
    assert len(calls) == 2
    assert OutboxEvent.objects.get().status == "sent"


@pytest.fixture
def help_calls(producer, monkeypatch, settings) -> list:
    """Batches of two (three events are a backlog); each call for help's apply_async options, recorded."""
    from relay import tasks, wake

    settings.OUTBOX_BATCH_SIZE = 2
    wake._redis().delete(wake.HELP_KEY)
    called = []
    monkeypatch.setattr(tasks.relay_outbox, "apply_async", lambda **options: called.append(options))
    return called


@pytest.mark.django_db
def test_a_run_that_finds_a_backlog_calls_one_more_run_at_once(help_calls, settings):
    """An idle worker process joins the drain now, not at beat's next poll; one call per poll interval."""
    enqueue("1", "OrderCreated")
    assert relay_run(budget=1).sent == 1  # no backlog: nobody is called
    assert help_calls == []
    for n in range(5):
        enqueue(str(n), "OrderCreated")
    assert relay_run(budget=1).sent == 5
    relay_run(budget=1)
    for n in range(5):
        enqueue(str(n), "OrderCancelled")
    assert relay_run(budget=1).sent == 5
    assert help_calls == [{"expires": settings.OUTBOX_POLL_INTERVAL}]  # the second backlog within the interval


@pytest.mark.django_db
def test_a_full_claim_calls_for_help_before_its_batch_is_published(help_calls, monkeypatch, settings):
    """The second worker process starts draining while the first publishes its first batch, not after it."""
    from relay import publish

    real_publish = publish.kafka.publish

    def publish_recorded(messages, **kwargs):
        help_calls.append("publish")
        return real_publish(messages, **kwargs)

    monkeypatch.setattr(publish.kafka, "publish", publish_recorded)
    for n in range(3):
        enqueue(str(n), "OrderCreated")
    assert relay_run(budget=1).sent == 3
    assert help_calls == [{"expires": settings.OUTBOX_POLL_INTERVAL}, "publish", "publish"]


@pytest.mark.django_db
def test_no_call_for_help_while_publishes_fail(help_calls, monkeypatch):
    """During a broker outage a second run would only wait out the same broker."""
    from relay import kafka

    monkeypatch.setattr(kafka.producer, "troubled_until", float("inf"))
    for n in range(3):
        enqueue(str(n), "OrderCreated")
    relay_run(budget=1)
    assert help_calls == []
