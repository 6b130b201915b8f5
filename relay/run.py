"""A relay run: batch after batch while full batches keep coming, within a time budget, in lanes with a backlog."""

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import OperationalError, connection

from ops.db import lock_conflict

from . import kafka
from .publish import BatchResult, relay_publish_batch

logger = logging.getLogger(__name__)



def relay_run(*, budget: float | None = None) -> BatchResult:
    """Publish batches while full batches keep coming, within a time budget.

    With a backlog (the first batch was full), OUTBOX_RELAY_LANES lanes drain side by side, each with its
    own database connection and transaction, sharing the process's producer: one lane's database work
    overlaps another's wait for broker acks.
    """
    budget = settings.OUTBOX_RUN_BUDGET if budget is None else budget
    deadline = time.monotonic() + budget
    from .wake import relay_call_for_help  # here: relay.wake imports this module

    def call_for_help() -> None:
        # A full claim is a backlog: another worker process drains beside this run from now on, not from the
        # end of this batch's publish. Not while publishes fail (a second run would wait out the same broker)
        # nor past this run's budget.
        if not kafka.producer.troubled and time.monotonic() < deadline:
            relay_call_for_help()

    first = _publish_batch_surviving_deadlocks(on_full_claim=call_for_help)
    if not _keep_going(first, deadline):
        return first
    lanes = max(1, settings.OUTBOX_RELAY_LANES)
    if lanes == 1:
        return first + _drain(deadline)
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="relay-lane") as pool:
        results = list(pool.map(lambda _: _drain_lane(deadline), range(lanes)))
    for result in results:
        first += result
    return first


def _publish_batch_surviving_deadlocks(attempts: int = 5, **options) -> BatchResult:
    """InnoDB may pick a claim or a mark of concurrent relays as a deadlock victim. The transaction is then
    rolled back and its rows are still pending: run the batch again (a rolled-back mark republishes, which
    consumers dedupe)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return relay_publish_batch(**options)
        except OperationalError as exc:
            if not lock_conflict(exc) or attempt == attempts:
                raise
            logger.info("relay batch rolled back (%s), running it again", exc.args[1])
            time.sleep(random.uniform(0.005, 0.05) * attempt)


def _keep_going(batch: BatchResult, deadline: float) -> bool:
    return batch.claimed >= settings.OUTBOX_BATCH_SIZE and batch.sent > 0 and time.monotonic() < deadline


def _drain(deadline: float) -> BatchResult:
    total = BatchResult()
    while True:
        batch = _publish_batch_surviving_deadlocks()
        total += batch
        if not _keep_going(batch, deadline):
            return total


def _drain_lane(deadline: float) -> BatchResult:
    try:
        return _drain(deadline)
    finally:
        connection.close()  # the lane's thread-local connection
