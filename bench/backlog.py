"""The drain benchmarks' backlog: created through the API, as users create theirs, once; kept in a table of its
own (bench_backlog); copied back into the outbox before each side of a comparison, so that every side starts
on the same rows, freshly inserted (a table truncated and filled again: no index churn from an earlier side).
"""

import http.client
import json
import threading

from django.db import connection, transaction

from bench.stack import Stack

SNAPSHOT = "bench_backlog"
CANCEL_EVERY = (0, 1)  # of every five orders, these are cancelled too: 40% of orders have two events


def _outbox_table() -> str:
    from outbox.models import OutboxEvent

    return OutboxEvent._meta.db_table


def _columns(table: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW COLUMNS FROM {table}")
        return [row[0] for row in cursor.fetchall()]


def snapshot_rows() -> int | None:
    """Events in the kept backlog, or None when there is none of the outbox's current shape."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW TABLES LIKE %s", [SNAPSHOT])
        if cursor.fetchone() is None or _columns(SNAPSHOT) != _columns(_outbox_table()):
            return None
        cursor.execute(f"SELECT COUNT(*) FROM {SNAPSHOT}")
        return cursor.fetchone()[0]


def create_through_api(n: int, *, token: str, port: int = 18001, clients: int = 16) -> None:
    """At least n events written by the API (gunicorn, no relay running): orders with one to three items, 40%
    of them cancelled; then kept as the backlog (exactly n rows)."""
    empty_outbox()
    stack = Stack(port=port, relay=False)
    written, errors, lock = [0], [], threading.Lock()

    def client(index: int) -> None:
        web = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        number = index
        while True:
            with lock:
                if written[0] >= n:
                    return
                cancel = number % 5 in CANCEL_EVERY
                written[0] += 2 if cancel else 1
            items = [{"sku": f"SKU-{k}", "quantity": 1 + k, "unit_price": "9.99"} for k in range(1 + number % 3)]
            web.request("POST", "/api/orders/", body=json.dumps({"customer_id": f"c-{number % 1000}", "items": items}),
                        headers=headers)
            response = web.getresponse()
            body = response.read()
            if response.status != 201:
                errors.append(response.status)
                return
            if cancel:
                web.request("POST", f"/api/orders/{json.loads(body)['id']}/cancel/", headers=headers)
                response = web.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(response.status)
                    return
            number += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stack.stop()
    if errors:
        raise RuntimeError(f"the API answered {errors[:5]} while the backlog was written")
    table = _outbox_table()
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {SNAPSHOT}")
        cursor.execute(f"CREATE TABLE {SNAPSHOT} LIKE {table}")
        cursor.execute(f"INSERT INTO {SNAPSHOT} SELECT * FROM {table} ORDER BY id LIMIT %s", [n])


def ensure(n: int, *, token: str) -> None:
    """The kept backlog if it has n events of the outbox's current shape, else a new one through the API."""
    if snapshot_rows() != n:
        create_through_api(n, token=token)


def empty_outbox() -> None:
    """TRUNCATE (a new, empty table and indexes), not DELETE: every side starts on the same index state."""
    from outbox.models import FailedEvent

    with connection.cursor() as cursor:
        cursor.execute("SET FOREIGN_KEY_CHECKS = 0")  # the failed-events table refers to the outbox
        try:
            cursor.execute(f"TRUNCATE TABLE {FailedEvent._meta.db_table}")
            cursor.execute(f"TRUNCATE TABLE {_outbox_table()}")
        finally:
            cursor.execute("SET FOREIGN_KEY_CHECKS = 1")


def restore(*, committed=None) -> None:
    """The backlog back in an empty outbox, pending, in one transaction. With committed (a callable), its commit
    calls committed() and then wakes the relay, as the commits that wrote the backlog would have."""
    from outbox.hooks import schedule_after_commit

    empty_outbox()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {_outbox_table()} SELECT * FROM {SNAPSHOT} ORDER BY id")
        if committed is not None:
            transaction.on_commit(committed)  # first: the clock starts before the wake-up is sent
            schedule_after_commit()
