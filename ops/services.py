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


def consumer_progress() -> list[dict]:
    """Per consumer group, from the database: events applied, the last one's time and how long ago (the overview's
    view of the consumer; the lag itself is the consumer's `inbox_consumer_lag` gauge)."""
    from django.db.models import Count, Max
    from django.utils import timezone

    from inbox.models import ConsumerDeadLetter, ProcessedEvent

    dead = dict(ConsumerDeadLetter.objects.exclude(replay_outcome__in=["applied", "already applied"])
                .values_list("group_id").annotate(n=Count("id")))
    now = timezone.now()
    return [
        {"group": row["group_id"], "applied": row["n"], "last_applied": row["last"],
         "since_last_applied": now - row["last"], "dead_letters": dead.get(row["group_id"], 0)}
        for row in ProcessedEvent.objects.values("group_id").annotate(n=Count("id"), last=Max("processed_at"))
        .order_by("group_id")
    ]
