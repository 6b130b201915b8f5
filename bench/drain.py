"""Relay drain throughput against raw SQL claim-and-mark and the raw producer, on the same table."""

from django.conf import settings
from django.db import connection, transaction

from bench import backlog
from bench.common import Timer
from bench.deployed import claim_and_mark


def raw_producer(n_expected: int) -> int:
    """Produce the table's messages with the relay's producer settings, no database work."""
    from relay import kafka
    from relay.claim import _claim
    from django.utils import timezone

    with transaction.atomic():
        rows = _claim(now=timezone.now(), batch_size=n_expected)
    messages = [row.message() for row in rows]
    with Timer() as t:
        for start in range(0, len(messages), 1000):
            deliveries = kafka.publish(messages[start:start + 1000], timeout=30)
            assert all(d.ok for d in deliveries)
    return len(messages), t.seconds


def relay_drain(batch_size: int) -> int:
    from relay.services import relay_run

    settings.OUTBOX_BATCH_SIZE = batch_size
    sent = 0
    while True:
        result = relay_run(budget=60)
        sent += result.sent
        if result.claimed == 0:
            return sent


def explain_claim() -> str:
    """The plans of the claim's statements (another lane's id range skipped): index / extra, each."""
    from django.utils import timezone

    from ops.db import db_datetime
    from relay.claim import claim_range_sql, claim_sql, first_due_sql

    now = db_datetime(timezone.now())
    plans = []
    with connection.cursor() as cursor:
        for name, statement, parameters in (("first due", first_due_sql, [now]),
                                            ("span", claim_range_sql, [1, 4000, now, 1000]),
                                            ("past the span", claim_sql, [now, 4000, 1000])):
            cursor.execute("EXPLAIN " + statement(skip_ranges=[(1, 1000)]), parameters)
            columns = [c[0] for c in cursor.description]
            plan = dict(zip(columns, cursor.fetchone()))
            plans.append(f"{name}: {plan['key']} / {plan['Extra']}")
    return "; ".join(plans)


def claim_over_backoff_ms() -> float:
    """One claim when every pending row is in backoff (a broker outage): what each poll costs then."""
    from django.utils import timezone

    from relay.claim import TABLE, _claim

    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {TABLE} SET status='pending', available_at = NOW(6) + INTERVAL 1 HOUR")
    with Timer() as t, transaction.atomic():
        assert _claim(now=timezone.now(), batch_size=1000) == []
    return t.seconds * 1000


def run(n: int, batch_sizes: list[int], *, token: str) -> dict:
    """Every measurement on the same backlog (bench.backlog, written through the API), freshly copied into a
    truncated outbox before it; raw SQL measured before and after the relay's batch sizes, the mean of the two
    its reference."""
    backlog.ensure(n, token=token)
    backlog.restore()
    results = {"events": n, "explain": explain_claim()}
    raw = []
    with Timer() as t:
        assert claim_and_mark(1000) == n
    raw.append(n / t.seconds)

    backlog.restore()
    produced, seconds = raw_producer(n)
    results["raw_producer_rate"] = produced / seconds

    results["relay_rate_by_batch"] = {}
    for batch_size in batch_sizes:
        backlog.restore()
        with Timer() as t:
            assert relay_drain(batch_size) == n
        results["relay_rate_by_batch"][batch_size] = n / t.seconds
    backlog.restore()
    with Timer() as t:
        assert claim_and_mark(1000) == n
    raw.append(n / t.seconds)
    results["raw_sql_rate"], results["raw_sql_rates"] = sum(raw) / len(raw), raw
    backlog.restore()
    results["claim_over_backoff_ms"] = claim_over_backoff_ms()
    backlog.empty_outbox()
    return results


if __name__ == "__main__":
    import sys

    from bench.common import setup_django, start_broker

    broker = start_broker()
    try:
        setup_django()
        from bench.common import bench_user_token

        n = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
        print(run(n, [1000], token=bench_user_token()))
    finally:
        broker.stop()
