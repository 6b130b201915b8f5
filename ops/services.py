import time

import redis
from django.conf import settings
from django.db import connection

from relay.kafka import broker_metadata_reachable

CHECK_TIMEOUT = 2.0


def _timed(check) -> dict:
    started = time.monotonic()
    try:
        check()
        return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _redis() -> None:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=CHECK_TIMEOUT,
                                  socket_connect_timeout=CHECK_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def _kafka() -> None:
    broker_metadata_reachable(timeout=CHECK_TIMEOUT)


def readiness_checks() -> dict[str, dict]:
    return {"database": _timed(_database), "redis": _timed(_redis), "kafka": _timed(_kafka)}


def consumer_progress(*, recent: int = 1000, lag: bool = False) -> list[dict]:
    """Per consumer group seen among the last `recent` applied events: the last one's time and how long ago,
    and its dead letters not replayed. Bounded on purpose: the processed-events table holds every event of
    INBOX_RETENTION_DAYS, which a per-group count would scan on every page view. With `lag`, also each group's
    lag on INBOX_TOPICS, asked of the broker (None when it does not answer within 2 s)."""
    from django.db.models import Count
    from django.utils import timezone

    from inbox.kafka import group_lag
    from inbox.models import ConsumerDeadLetter, ProcessedEvent

    last_applied: dict[str, object] = {}
    for group_id, processed_at in ProcessedEvent.objects.order_by("-id").values_list("group_id", "processed_at")[:recent]:
        last_applied.setdefault(group_id, processed_at)
    dead = dict(ConsumerDeadLetter.objects.exclude(replay_outcome__in=["applied", "already applied"])
                .values_list("group_id").annotate(n=Count("id")))
    now = timezone.now()
    groups = sorted({**dict.fromkeys(dead), **last_applied}.items())
    return [
        {"group": group, "last_applied": at, "since_last_applied": now - at if at else None,
         "dead_letters": dead.get(group, 0),
         "lag": group_lag(group, settings.INBOX_TOPICS) if lag else None}
        for group, at in groups
    ]
