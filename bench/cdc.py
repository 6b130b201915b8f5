"""relay_cdc beside the Celery relay, in the same run, on the same database server and broker.

The server is a MariaDB of the benchmark's own with the binlog on (tests/cdc_tools.py: own port and data directory,
so its CPU time is the relays' work alone). For each relay:
- drain: a backlog of n events committed in one transaction while the relay runs (the Celery relay as deployed,
  `celery -A project worker` and `beat`, woken by the commit; relay_cdc streaming), events/s from the commit until
  the last is read off the topic (bench.topic_count), with no query on the database inside the window;
- latency: events written by the app's own enqueue (one transaction each) at a steady rate, commit-to-topic
  (a reader of the topic, as bench.http_load measures it), p50/p99;
- database CPU: the server process's CPU seconds over the drain, per event.

make bench runs it (docs/benchmarks-cdc.md); alone: PYTHONPATH=. .venv/bin/python -m bench.cdc [--events N]
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

from tests.cdc_tools import BinlogDatabase

DB = BinlogDatabase()
os.environ["DATABASE_URL"] = DB.url  # before bench.common's defaults and Django's settings
os.environ.setdefault("OUTBOX_CDC_POSITION_EVERY", "1")

from bench.common import ROOT, prefill_outbox, truncate_outbox  # noqa: E402
from bench.http_load import TopicWatcher, percentile  # noqa: E402
from bench.stack import process_env  # noqa: E402
from bench.topic_count import TopicCounter  # noqa: E402

TOPIC = "outbox.event.order"
VENV_BIN = os.path.dirname(sys.executable)


def server_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pending_left() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM outbox_outboxevent WHERE status <> 'sent' LIMIT 1")
        return cursor.fetchone() is not None


class Relay:
    """The processes of one relay, started and stopped around a measurement."""

    def __init__(self, kind: str, bootstrap: str):
        self.kind, self.bootstrap = kind, bootstrap
        self.log = open(ROOT / ".run" / f"bench-cdc-{kind}.log", "ab")
        env = process_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap, **DB.env())
        if kind == "relay":
            commands = [[f"{VENV_BIN}/celery", "-A", "project", "worker", "--loglevel", "WARNING", "--without-mingle",
                         "--without-gossip"],
                        [f"{VENV_BIN}/celery", "-A", "project", "beat", "--loglevel", "WARNING", "--schedule",
                         str(ROOT / ".run" / "bench-cdc-beat-schedule")]]
        else:
            commands = [[f"{VENV_BIN}/python", "manage.py", "relay_cdc"]]
            env["OUTBOX_RELAY_ENABLED"] = "0"
        self.processes = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=self.log, stderr=self.log,
                                           start_new_session=True) for c in commands]
        time.sleep(10)  # the worker's producers are warm; relay_cdc's JVM is up and streaming

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(60)
        self.log.close()

    def alive(self) -> bool:
        return all(process.poll() is None for process in self.processes)


def drain(kind: str, n: int, bootstrap: str) -> dict:
    from django.db import transaction

    from outbox.hooks import schedule_after_commit

    truncate_outbox()
    relay = Relay(kind, bootstrap)
    counter = TopicCounter(bootstrap, TOPIC, from_end=True)
    try:
        cpu = server_cpu_seconds(DB.process.pid)
        committed = []
        with transaction.atomic():
            prefill_outbox(n)
            transaction.on_commit(lambda: committed.append(time.perf_counter()))
            schedule_after_commit()  # the relay's wake-up, as the commits that wrote the events would do
        # Both relays alike: until the last message is read off the topic, with no query on the database inside.
        try:
            finished = counter.reached(n, timeout=900, alive=relay.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"the {kind} drain did not finish ({exc}); see .run/bench-cdc-{kind}.log") from None
        cpu = server_cpu_seconds(DB.process.pid) - cpu
    finally:
        counter.stop()
        relay.stop()
    if kind == "relay" and _pending_left():  # after the window: the relay marks what the broker acknowledged
        raise RuntimeError("rows not marked sent although their messages are on the topic")
    return {"rate": n / (finished - committed[0]), "db_cpu_us_per_event": cpu / n * 1e6}


def steady(kind: str, rate: int, seconds: float, bootstrap: str) -> dict:
    from django.db import transaction

    from outbox.services import outbox_enqueue

    truncate_outbox()
    relay = Relay(kind, bootstrap)
    marker = f"bench-cdc-{uuid.uuid4().hex[:12]}"
    watcher = TopicWatcher(bootstrap, TOPIC, marker=marker.encode())
    watcher.start()
    try:
        start, total = time.monotonic(), int(rate * seconds)
        for n in range(total):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with transaction.atomic():
                outbox_enqueue(aggregate_type="order", aggregate_id=f"{marker}-{n}", event_type="OrderCreated",
                               payload={"order_id": f"{marker}-{n}", "customer_id": marker, "total": "9.99"})
        deadline = time.monotonic() + 60
        while len(watcher.latencies) < total and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watcher.stopping = True
        watcher.join(5)
        relay.stop()
    latencies = [v * 1000 for v in watcher.latencies.values()]  # in the order they arrived
    later = latencies[len(latencies) // 2:]  # without the first seconds after a start (connections, JIT)
    return {"events": total, "received": len(latencies),
            "p50_ms": percentile(latencies, 50) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None,
            "p99_second_half_ms": percentile(later, 99) if later else None,
            "max_ms": max(latencies) if latencies else None}


def run(*, events: int, rate: int, seconds: float, bootstrap: str) -> dict:
    from django.conf import settings

    results = {"events": events, "rate": rate}
    for kind in ("relay", "cdc"):
        # The app's own commits wake the Celery relay only when it publishes (OUTBOX_RELAY_ENABLED).
        settings.OUTBOX_RELAY_ENABLED = kind == "relay"
        print(f"{kind}: drain...", flush=True)
        results[kind] = {"drain": drain(kind, events, bootstrap)}
        print(f"{kind}: steady rate...", flush=True)
        results[kind]["steady"] = steady(kind, rate, seconds, bootstrap)
    settings.OUTBOX_RELAY_ENABLED = True
    return results


def report(results: dict) -> str:
    lines = ["# relay_cdc beside the Celery relay (same run, same binlog MariaDB and broker)", "",
             f"Drain of {results['events']:,} events committed at once; commit-to-topic latency at "
             f"{results['rate']} events/s written by the app's enqueue; the database server's CPU per drained event.",
             "", "| | Celery relay (worker + beat) | relay_cdc |", "|---|---|---|"]
    relay, cdc = results["relay"], results["cdc"]
    lines.append(f"| drain, events/s | {relay['drain']['rate']:,.0f} | {cdc['drain']['rate']:,.0f} |")
    lines.append(f"| database CPU per event, µs | {relay['drain']['db_cpu_us_per_event']:,.0f} | "
                 f"{cdc['drain']['db_cpu_us_per_event']:,.0f} |")
    for p in ("p50_ms", "p99_ms"):
        lines.append(f"| latency {p[:3]}, ms | {relay['steady'][p]:,.1f} | {cdc['steady'][p]:,.1f} |")
    lines.append(f"| latency p99 of the second half, ms | {relay['steady']['p99_second_half_ms']:,.1f} | "
                 f"{cdc['steady']['p99_second_half_ms']:,.1f} |")
    lines.append(f"| latency max, ms | {relay['steady']['max_ms']:,.1f} | {cdc['steady']['max_ms']:,.1f} |")
    lines.append(f"| events seen at steady rate | {relay['steady']['received']}/{relay['steady']['events']} | "
                 f"{cdc['steady']['received']}/{cdc['steady']['events']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    from bench.common import start_broker

    DB.install()
    broker = start_broker()
    try:
        import django

        django.setup()
        results = run(events=args.events, rate=args.rate, seconds=args.seconds, bootstrap=broker.bootstrap)
    finally:
        broker.stop()
        DB.destroy()
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (ROOT / "docs" / "benchmarks-cdc.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (ROOT / "docs" / "benchmarks-cdc.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
