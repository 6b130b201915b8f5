import os
import signal
import time
from pathlib import Path

from django.db import transaction

from inbox.registry import handles
from inbox.services import InboundEvent
from stats.handlers import project_order_events


def order_created(payload: dict, headers: dict) -> None:
    """What the stats projection does with an OrderCreated, through the per-event handler form."""
    project_order_events([InboundEvent(event_id=headers["id"], event_type="OrderCreated", payload=payload, headers=headers)])


# Per-process counters the in-process tests read.
calls: dict[str, int] = {}
fail_times: dict[str, int] = {}


@handles("TestFlaky")
def flaky(payload: dict, headers: dict) -> None:
    calls["TestFlaky"] = calls.get("TestFlaky", 0) + 1
    if calls["TestFlaky"] <= fail_times.get("TestFlaky", 0):
        raise RuntimeError(f"transient failure {calls['TestFlaky']}")
    order_created(payload, headers)


@handles("TestBroken")
def broken(payload: dict, headers: dict) -> None:
    calls["TestBroken"] = calls.get("TestBroken", 0) + 1
    raise ValueError("this handler always fails")


@handles("TestCrashAfterCommit")
def crash_after_commit(payload: dict, headers: dict) -> None:
    """Applies an OrderCreated, then (once, while the marker file exists) SIGKILLs its own process right
    after the database commit: before the consumer can commit the Kafka offset."""
    order_created(payload, headers)
    marker = Path(payload["crash_marker"])
    if marker.exists():
        marker.unlink()
        transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))


@handles("TestServerError")
def server_error(payload: dict, headers: dict) -> None:
    """A server error that is the message's fault (not a lost connection): it must end in the DLQ."""
    from django.db import OperationalError

    raise OperationalError(1366, "Incorrect decimal value")


@handles("TestHold")
def hold(payload: dict, headers: dict) -> None:
    """Applies an OrderCreated, but first says it is here (creates payload["entered"]) and waits until the test
    creates payload["release"] (at most a minute): a batch caught in the middle of its transaction."""
    Path(payload["entered"]).touch()
    deadline = time.monotonic() + 60
    while not Path(payload["release"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    order_created(payload, headers)


@handles("TestReadOnlyTwice")
def read_only_twice(payload: dict, headers: dict) -> None:
    """The database read-only during a failover (MariaDB's 1290), twice, then writable again: waited out."""
    from django.db import OperationalError

    calls["TestReadOnlyTwice"] = calls.get("TestReadOnlyTwice", 0) + 1
    if calls["TestReadOnlyTwice"] <= 2:
        raise OperationalError(1290, "The MariaDB server is running with the --read-only option")
    order_created(payload, headers)
