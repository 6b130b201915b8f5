"""The commit hook: the outbox calls what is registered after events commit, and never imports the relay."""

import ast
from pathlib import Path

import pytest
from django.db import transaction

from outbox import hooks
from outbox.models import FailedEvent, OutboxEvent
from outbox.services import failed_event_requeue, outbox_enqueue
from relay.services import relay_wake

OUTBOX = Path(hooks.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_outbox_never_imports_the_relay():
    sources = sorted(OUTBOX.rglob("*.py"))
    assert OUTBOX / "services.py" in sources
    importing_relay = {
        str(path.relative_to(OUTBOX)): sorted(name for name in imported_modules(path) if name.split(".")[0] == "relay")
        for path in sources
    }
    assert {path: names for path, names in importing_relay.items() if names} == {}


def test_the_relay_registers_its_wake_up():
    assert hooks._after_commit == [relay_wake]


@pytest.fixture
def calls(monkeypatch):
    calls = []
    monkeypatch.setattr(hooks, "_after_commit", [lambda: calls.append("committed")])
    return calls


def enqueue():
    return outbox_enqueue(aggregate_type="order", aggregate_id="1", event_type="OrderCreated", payload={})


@pytest.mark.django_db
def test_an_enqueue_runs_the_hooks_once_its_transaction_commits(calls, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        enqueue()
        enqueue()
        assert calls == []
    assert calls == ["committed", "committed"]


@pytest.mark.django_db
def test_a_rolled_back_enqueue_runs_no_hook(calls, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError), transaction.atomic():
        enqueue()
        raise RuntimeError("the order write failed")
    assert calls == []


@pytest.mark.django_db
def test_no_hook_for_an_enqueue_without_wake_on_commit(calls, settings, django_capture_on_commit_callbacks):
    settings.OUTBOX_WAKE_ON_COMMIT = False
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        enqueue()
    assert calls == []


@pytest.mark.django_db
def test_a_requeue_runs_the_hooks(calls, user, django_capture_on_commit_callbacks):
    with transaction.atomic():
        event = enqueue()
    OutboxEvent.objects.filter(pk=event.pk).update(status=OutboxEvent.Status.DEAD)
    FailedEvent.objects.create(
        outbox_event_id=event.pk, event_id=event.event_id, aggregate_type="order", aggregate_id="1",
        event_type="OrderCreated", topic="outbox.event.order", payload={}, headers={}, error="refused",
        attempts=1, status=FailedEvent.Status.DEAD_LETTERED,
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert failed_event_requeue(failed_events=FailedEvent.objects.all(), user=user) == 1
    assert calls == ["committed"]
