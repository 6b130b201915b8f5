"""The relay's drain as deployed against raw SQL, side by side and like for like.

The backlog is written through the API once (bench.backlog) and copied back into a freshly truncated outbox
before every side, so each side starts on the same rows in the same index state. The sides, in rounds, in an
order that turns each round (no side always first):

- raw SQL claim-and-mark (FOR UPDATE SKIP LOCKED, then UPDATE ... status='sent'), one process on one connection;
- the same in two processes (what two relay processes compare with), released together once both are connected;
- the deployed relay: `celery -A project worker --concurrency 2` and `celery -A project beat`, started before the
  backlog and warmed (an event published end to end), timed from the commit that writes the backlog (which wakes
  the relay, as a burst of commits would) until its last message is read off the topic: no query on the database
  under test inside the window; that every row is marked sent is checked after it.

For each side, MariaDB's CPU seconds per 1,000 events too (its /proc counters around the window).
"""

import statistics
import subprocess
import sys
import time
import uuid

from django.db import OperationalError, connection

from bench import backlog
from bench.common import ROOT
from bench.processes import cpu_seconds, in_processes, mariadb_pid, tree_cpu_seconds
from bench.stack import process_env
from bench.topic_count import TopicCounter
from ops.db import lock_conflict

VENV_BIN = f"{sys.prefix}/bin"
LOG = ROOT / ".run" / "bench-deployed.log"
WORKER_CONCURRENCY = 2
SIDES = ("raw_sql_1", "raw_sql_2", "deployed")


def claim_and_mark(batch_size: int = 1000) -> int:
    """The naive loop with no Kafka: claim a batch with SKIP LOCKED, mark it sent, commit; rows it marked."""
    from django.db import transaction

    from outbox.models import OutboxEvent

    table = OutboxEvent._meta.db_table
    done = 0
    while True:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(f"SELECT id FROM {table} WHERE status='pending' ORDER BY id LIMIT %s "
                               f"FOR UPDATE SKIP LOCKED", [batch_size])
                ids = [r[0] for r in cursor.fetchall()]
                if not ids:
                    return done
                cursor.execute(f"UPDATE {table} SET status='sent', published_at=NOW(6) "
                               f"WHERE id IN ({','.join(map(str, ids))})")
        except OperationalError as exc:
            if not lock_conflict(exc):
                raise
            continue  # two loops side by side: InnoDB may pick one as a deadlock victim, as it may a relay's batch
        done += len(ids)


def raw_sql(n: int, connections: int) -> dict:
    backlog.restore()
    counts, seconds, database_cpu = in_processes([(claim_and_mark, ())] * connections)
    if sum(counts) != n:
        raise RuntimeError(f"raw SQL marked {sum(counts)} of {n} rows")
    return {"rate": n / seconds, "seconds": seconds, "database_cpu_ms_per_1000": database_cpu / n * 1e6}


def _unsent() -> int:
    from outbox.models import OutboxEvent

    return OutboxEvent.objects.exclude(status="sent").count()


def deployed(n: int, broker, *, prefix: str | None = None) -> dict:
    """The drain by a worker (concurrency 2) and beat on topics of this round's own (prefix: OUTBOX_TOPIC_PREFIX;
    the backlog goes to prefix + "order", the warm-up event to prefix + "warmup")."""
    from outbox.services import outbox_enqueue

    prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}."
    broker.create_topics(prefix + "order", prefix + "warmup")
    backlog.empty_outbox()
    env = process_env(OUTBOX_TOPIC_PREFIX=prefix)
    with open(LOG, "ab") as log:
        worker = subprocess.Popen([f"{VENV_BIN}/celery", "-A", "project", "worker", "--loglevel", "WARNING",
                                   "--without-mingle", "--without-gossip", "--concurrency", str(WORKER_CONCURRENCY)],
                                  cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
        beat = subprocess.Popen([f"{VENV_BIN}/celery", "-A", "project", "beat", "--loglevel", "WARNING",
                                 "--schedule", str(ROOT / ".run" / "bench-beat-schedule")], cwd=ROOT, env=env,
                                stdout=log, stderr=log, start_new_session=True)
    counter, warmed = TopicCounter(broker.bootstrap, prefix + "order"), TopicCounter(broker.bootstrap, prefix + "warmup")
    alive = lambda: worker.poll() is None and beat.poll() is None  # noqa: E731
    try:
        # Ready when an event goes through end to end (the worker's children are up, their producers built;
        # beat ticks); then the outbox is emptied again for the backlog.
        from django.db import transaction

        with transaction.atomic():
            outbox_enqueue(aggregate_type="warmup", aggregate_id="0", event_type="Warmup", payload={})
        warmed.reached(1, timeout=120, alive=alive)
        database = mariadb_pid()
        committed = []
        backlog.restore(committed=lambda: committed.append((time.perf_counter(), cpu_seconds(database),
                                                            tree_cpu_seconds(worker.pid),
                                                            cpu_seconds(broker.process.pid))))
        finished = counter.reached(n, timeout=600, alive=alive)
        database_cpu, relay_cpu = cpu_seconds(database), tree_cpu_seconds(worker.pid)
        broker_cpu = cpu_seconds(broker.process.pid)
        started, database_cpu_before, relay_cpu_before, broker_cpu_before = committed[0]
    finally:
        counter.stop()
        warmed.stop()
        for process in (worker, beat):
            process.terminate()
        for process in (worker, beat):
            process.wait(30)
    unsent = _unsent()  # after the window
    if unsent:
        raise RuntimeError(f"{unsent} rows not marked sent although their messages are on the topic")
    # The CPU counters are read a moment after the last message: a slight over-count, against the relay.
    seconds = finished - started
    return {"rate": n / seconds, "seconds": seconds,
            "database_cpu_ms_per_1000": (database_cpu - database_cpu_before) / n * 1e6,
            "relay_cpu_ms_per_1000": (relay_cpu - relay_cpu_before) / n * 1e6,
            "broker_cpu_ms_per_1000": (broker_cpu - broker_cpu_before) / n * 1e6}


def run(n: int, broker, *, token: str, rounds: int = 5) -> dict:
    backlog.ensure(n, token=token)
    results = {"events": n, "worker_concurrency": WORKER_CONCURRENCY, "rounds": []}
    for number in range(rounds):
        order = SIDES[number % len(SIDES):] + SIDES[:number % len(SIDES)]
        measured = {}
        for side in order:
            if side == "deployed":
                measured[side] = deployed(n, broker)
            else:
                measured[side] = raw_sql(n, int(side[-1]))
            print(f"    round {number + 1} {side}: {measured[side]['rate']:,.0f}/s", flush=True)
        measured["order"] = list(order)
        measured["vs_one"] = measured["deployed"]["rate"] / measured["raw_sql_1"]["rate"]
        measured["vs_two"] = measured["deployed"]["rate"] / measured["raw_sql_2"]["rate"]
        results["rounds"].append(measured)
    results["median_vs_one"] = statistics.median(r["vs_one"] for r in results["rounds"])
    results["median_vs_two"] = statistics.median(r["vs_two"] for r in results["rounds"])
    for side in SIDES:
        results[f"median_{side}_rate"] = statistics.median(r[side]["rate"] for r in results["rounds"])
        results[f"median_{side}_database_cpu_ms_per_1000"] = statistics.median(
            r[side]["database_cpu_ms_per_1000"] for r in results["rounds"])
    for part in ("relay", "broker"):
        results[f"median_{part}_cpu_ms_per_1000"] = statistics.median(
            r["deployed"][f"{part}_cpu_ms_per_1000"] for r in results["rounds"])
    backlog.empty_outbox()
    return results


def report_lines(d: dict) -> list[str]:
    lines = [f"- round {i + 1} ({', '.join(r['order'])}): raw SQL one connection {r['raw_sql_1']['rate']:,.0f} rows/s, "
             f"two {r['raw_sql_2']['rate']:,.0f}, deployed {r['deployed']['rate']:,.0f} events/s = "
             f"{r['vs_one']:.2f} of one, {r['vs_two']:.2f} of two" for i, r in enumerate(d["rounds"])]
    lines.append(
        f"- MariaDB CPU per 1,000 events (median of rounds): raw SQL one connection "
        f"{d['median_raw_sql_1_database_cpu_ms_per_1000']:.1f} ms, two {d['median_raw_sql_2_database_cpu_ms_per_1000']:.1f} ms, "
        f"deployed {d['median_deployed_database_cpu_ms_per_1000']:.1f} ms; beside it, deployed, the relay's "
        f"processes {d['median_relay_cpu_ms_per_1000']:.1f} ms and the broker {d['median_broker_cpu_ms_per_1000']:.1f} ms")
    return lines


if __name__ == "__main__":  # python -m bench.deployed [events] [rounds]
    from bench.common import bench_user_token, setup_django, start_broker

    broker = start_broker()
    try:
        setup_django()
        results = run(int(sys.argv[1]) if len(sys.argv) > 1 else 40_000, broker, token=bench_user_token(),
                      rounds=int(sys.argv[2]) if len(sys.argv) > 2 else 5)
        print("\n".join(report_lines(results)))
        print(f"median of rounds: deployed / one connection {results['median_vs_one']:.2f}, "
              f"/ two {results['median_vs_two']:.2f}")
    finally:
        broker.stop()
