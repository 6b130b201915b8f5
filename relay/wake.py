"""The on-commit wake-up: a commit queues a relay run through a Redis flag, and that run follows the commits
that come after it, so a burst of commits costs one task instead of one each."""

import logging
import time

import redis
from django.conf import settings

from .publish import BatchResult
from .run import relay_run

logger = logging.getLogger(__name__)

WAKE_KEY = "outbox:relay:wake"
HELP_KEY = "outbox:relay:help"


def relay_wake() -> None:
    """Called after a commit that wrote events: queue a relay run unless one is queued or following.

    The flag says "a relay will claim after your commit": a queued run, or a run that keeps following new
    commits (relay_follow). Its TTL and the task's expiry keep runs from piling up while no worker is up.
    """
    from .tasks import relay_outbox  # imported here: relay.tasks imports this module, through relay.services

    if not settings.OUTBOX_RELAY_ENABLED:  # relay_cdc publishes: no Redis write, no task per commit
        return
    try:
        if _redis().set(WAKE_KEY, "1", nx=True, px=int(settings.OUTBOX_WAKE_EXPIRES * 1000)):
            relay_outbox.apply_async(kwargs={"woken": True}, expires=settings.OUTBOX_WAKE_EXPIRES)
    except Exception:
        # The commit is done; beat's poll picks the event up within OUTBOX_POLL_INTERVAL.
        logger.warning("could not wake the relay; the next poll will publish", exc_info=True)


def relay_follow() -> BatchResult:
    """The woken relay run: publish, then keep claiming every OUTBOX_WAKE_LINGER seconds while commits keep
    coming, holding the wake flag so that those commits queue no further runs (under load, one run serves
    many commits and claims several events at a time instead of one task per commit).

    After a claim that finds nothing it releases the flag and claims once more: a commit that saw the flag
    still held queued nothing, and that last claim publishes it.
    """
    deadline = time.monotonic() + settings.OUTBOX_RUN_BUDGET
    total = BatchResult()
    _wake_flag_hold()
    try:
        while True:
            batch = relay_run(budget=max(0.0, deadline - time.monotonic()))
            total += batch
            if batch.sent == 0 or time.monotonic() >= deadline:
                break
            time.sleep(settings.OUTBOX_WAKE_LINGER)
    finally:
        relay_wake_clear()  # also when a run failed: the next commit wakes a new run
    return total + relay_run(budget=max(0.0, deadline - time.monotonic()))


def relay_call_for_help() -> None:
    """Called by a run that found a backlog: queue one more run now, for an idle worker process to drain beside
    it, instead of at beat's next poll (a 40,000-event backlog drains in about two seconds; beat polls every
    second). At most one call per OUTBOX_POLL_INTERVAL, expiring after it: a queued call nobody took is dropped."""
    from .tasks import relay_outbox

    try:
        if _redis().set(HELP_KEY, "1", nx=True, px=int(settings.OUTBOX_POLL_INTERVAL * 1000)):
            relay_outbox.apply_async(expires=settings.OUTBOX_POLL_INTERVAL)
    except Exception:
        logger.warning("could not ask for a second relay run; beat's next poll starts one", exc_info=True)


def _wake_flag_hold() -> None:
    # For longer than the following can take (its budget, then one batch's publish timeout), so the flag
    # cannot lapse mid-run and let commits queue a second following run; a killed worker's flag lapses
    # after that (beat's poll publishes meanwhile).
    ttl = settings.OUTBOX_WAKE_EXPIRES + settings.OUTBOX_RUN_BUDGET + settings.OUTBOX_PUBLISH_TIMEOUT
    try:
        _redis().set(WAKE_KEY, "1", px=int(ttl * 1000))
    except Exception:
        logger.warning("could not hold the relay wake flag", exc_info=True)


def relay_wake_clear() -> None:
    try:
        _redis().delete(WAKE_KEY)
    except Exception:
        logger.warning("could not clear the relay wake flag", exc_info=True)


_redis_client = None


def _redis() -> redis.Redis:
    global _redis_client
    if _redis_client is None:
        _redis_client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1, socket_connect_timeout=1)
    return _redis_client
