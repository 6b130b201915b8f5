"""Shared set-up for the benchmarks: a database and a broker of their own, Django configured for them."""

import os
import pathlib
import sys
import time
import uuid
from datetime import datetime, timezone

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_DB = os.environ.get("BENCH_DATABASE", "orders_bench")
os.environ.setdefault("DATABASE_URL", f"mysql://root@127.0.0.1:3306/{BENCH_DB}")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only")
os.environ["DJANGO_DEBUG"] = "0"  # DEBUG keeps every query in memory: never in a benchmark
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")


def start_broker():
    from tests.kafka_tools import Broker

    broker = Broker(topics=("outbox.event.order", "outbox.dlq", "order-stats.dlq"), log_dir=ROOT / ".run")
    broker.start()
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
    return broker


def setup_django():
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "scripts" / "ensure_database.py")], check=True, stdout=subprocess.DEVNULL)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def prefill_outbox(n: int, *, payload_items: int = 2, traced: bool = False) -> None:
    """Insert n pending events fast (multi-row INSERTs): ~60% of orders have one event, the rest two. traced: each
    row carries the W3C trace context of the request that wrote it, as rows written by a traced web do."""
    from django.db import connection

    from outbox.models import OutboxEvent

    table = OutboxEvent._meta.db_table
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = []
    order = 0
    while len(rows) < n:
        order += 1
        payload = ('{"order_id": "%d", "customer_id": "c-%d", "total": "19.98", "items": [%s]}'
                   % (order, order % 1000, ", ".join(['{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}'] * payload_items)))
        trace = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01" if traced else ""
        rows.append((uuid.uuid4().hex, "order", str(order), "OrderCreated", payload, now, "pending", 0, now, "", -1, -1,
                     trace))
        if order % 5 < 2 and len(rows) < n:
            rows.append((uuid.uuid4().hex, "order", str(order), "OrderCancelled", payload, now, "pending", 0, now, "",
                         -1, -1, trace))
    columns = ("event_id, aggregate_type, aggregate_id, event_type, payload, occurred_at, status, attempts, available_at, "
               "last_error, kafka_partition, kafka_offset, trace_parent")
    with connection.cursor() as cursor:
        for start in range(0, len(rows), 5000):
            chunk = rows[start:start + 5000]
            placeholders = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(chunk))
            cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {placeholders}", [v for row in chunk for v in row])


def truncate_outbox() -> None:
    from django.db import connection

    from outbox.models import FailedEvent, OutboxEvent

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {FailedEvent._meta.db_table}")
        cursor.execute(f"DELETE FROM {OutboxEvent._meta.db_table}")


def bench_user_token() -> str:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(username="bench")
    return Token.objects.get_or_create(user=user)[0].key


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
