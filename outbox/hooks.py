"""Callbacks run after a transaction that wrote outbox events commits.

The outbox does not know who publishes its rows: the relay app registers its wake-up here from its
AppConfig.ready(); a CDC connector reading the binlog needs no call.
"""

from collections.abc import Callable

from django.db import transaction

_after_commit: list[Callable[[], None]] = []


def register_after_commit(callback: Callable[[], None]) -> None:
    """Run callback() after the commit of every transaction that wrote events (once per write in it).

    It must not raise: it runs once the data is committed, and an exception would reach the code that
    committed as if its write had failed.
    """
    _after_commit.append(callback)


def schedule_after_commit() -> None:
    """Called by a write inside its transaction: the callbacks run if and when that transaction commits."""
    for callback in _after_commit:
        transaction.on_commit(callback)
