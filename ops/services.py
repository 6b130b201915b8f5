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
