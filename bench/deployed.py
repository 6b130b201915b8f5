"""The relay's drain as deployed: `celery -A project worker` (default concurrency) and `celery -A project beat`,
against raw SQL claim-and-mark on the same table with one and two connections, in the same run.

The backlog is orders with items, some cancelled (bench.common.prefill_outbox), written while the processes run
and released in one commit that wakes the relay, as a burst of commits would.
"""

import subprocess
import sys
import threading
import time

from django.db import connection, connections, transaction

from bench.common import ROOT, Timer, prefill_outbox, reset_outbox_pending, truncate_outbox
from bench.drain import raw_sql_claim_and_mark
from bench.stack import process_env

VENV_BIN = f"{sys.prefix}/bin"


def raw_sql_two_connections(batch_size: int) -> float:
    """Two naive loops side by side, each on its own connection: rows/s together."""
    done = []

    def loop():
        try:
            done.append(raw_sql_claim_and_mark(batch_size))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=loop) for _ in range(2)]
    with Timer() as t:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum(done) / t.seconds


def _pending_left() -> bool:
    from outbox.models import OutboxEvent

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {OutboxEvent._meta.db_table} WHERE status <> 'sent' LIMIT 1")
        return cursor.fetchone() is not None


def deployed_drain(n: int, *, log_path) -> float:
    """Events/s from the commit of a backlog of n events until none is left, drained by a worker and beat.

    The backlog is written while the processes run, in one transaction (invisible to them until it commits),
    and its commit wakes the relay, as a burst of commits would: the drain starts on rows as they were
    inserted. (Holding written rows back with a future available_at and releasing them with an UPDATE of
    every row put that UPDATE in the timed window, and left the claim index full of entries the claims had to
    walk past until purged.)"""
    from outbox.hooks import schedule_after_commit

    truncate_outbox()
    env = process_env()
    with open(log_path, "ab") as log:
        processes = [
            subprocess.Popen([f"{VENV_BIN}/celery", "-A", "project", "worker", "--loglevel", "WARNING",
                              "--without-mingle", "--without-gossip"], cwd=ROOT, env=env, stdout=log, stderr=log,
                             start_new_session=True),
            subprocess.Popen([f"{VENV_BIN}/celery", "-A", "project", "beat", "--loglevel", "WARNING",
                              "--schedule", str(ROOT / ".run" / "bench-beat-schedule")], cwd=ROOT, env=env,
                             stdout=log, stderr=log, start_new_session=True),
        ]
    try:
        time.sleep(5)  # the worker's children are up and have warmed their producers; beat ticks
        committed = []
        with transaction.atomic():
            prefill_outbox(n)
            transaction.on_commit(lambda: committed.append(time.perf_counter()))  # runs first: the clock starts
            schedule_after_commit()  # what the commits that wrote these events would have done
        deadline = time.monotonic() + 600
        while _pending_left():
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"the deployed drain did not finish; see {log_path}")
            time.sleep(0.05)
        return n / (time.perf_counter() - committed[0])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def run(n: int, rounds: int = 5) -> dict:
    """Rounds of raw SQL (one connection, then two) and the deployed drain, back to back. This machine's speed
    was seen to swing by a quarter from one minute to the next, so one pair decides little: the headline figures
    are the round whose deployed / one-connection ratio is the median; every round is kept."""
    results = {"events": n, "rounds": []}
    for _ in range(rounds):
        truncate_outbox()
        prefill_outbox(n)
        with Timer() as t:
            assert raw_sql_claim_and_mark(1000) == n
        one = n / t.seconds
        reset_outbox_pending()
        two = raw_sql_two_connections(1000)
        rate = deployed_drain(n, log_path=ROOT / ".run" / "bench-deployed.log")
        results["rounds"].append({"raw_sql_rate": one, "raw_sql_two_connections_rate": two, "deployed_rate": rate})
    by_ratio = sorted(results["rounds"], key=lambda r: r["deployed_rate"] / r["raw_sql_rate"])
    results.update(by_ratio[len(by_ratio) // 2])
    return results


if __name__ == "__main__":
    from bench.common import setup_django, start_broker

    broker = start_broker()
    try:
        setup_django()
        results = run(int(sys.argv[1]) if len(sys.argv) > 1 else 40_000)
        for r in results["rounds"]:
            print(f"round: raw SQL {r['raw_sql_rate']:,.0f} rows/s, two connections {r['raw_sql_two_connections_rate']:,.0f}, "
                  f"deployed {r['deployed_rate']:,.0f} events/s = {r['deployed_rate'] / r['raw_sql_rate']:.2f}")
        print(f"median round: deployed / raw SQL: {results['deployed_rate'] / results['raw_sql_rate']:.2f}; "
              f"/ two connections: {results['deployed_rate'] / results['raw_sql_two_connections_rate']:.2f}")
    finally:
        broker.stop()
