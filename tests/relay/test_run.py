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
