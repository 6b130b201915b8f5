"""End-to-end chaos run with the real processes (the DESIGN's "Reliability proof").

    PYTHONPATH=. .venv/bin/python -m chaos.run [--seconds N] [--rate R] [--quick]

Starts, each as its own subprocess in its own process group, the way a deployment runs them:
gunicorn project.wsgi (2 workers), a Celery worker (concurrency 2), Celery beat, manage.py consume_events,
and a Tansu broker. Orders are created over HTTP at a steady rate (a quarter cancelled shortly after) while a
fault schedule SIGKILLs and restarts the broker, the Celery worker and the consumer, and restarts MariaDB.
Then the load stops, the system drains, and the committed truth (the API's 201/200 answers) is checked
against what a checker read from Kafka all along, what the consumer applied, and the projection.

Exit status: 0 when every must-be-zero figure is 0, 1 when one is not, 2 when the run itself broke.

Why the broker kill is "gated": Tansu keeps its log in memory, so a SIGKILL throws away every message it had
acknowledged, which a real Kafka keeps on disk. To measure the product and not the dev broker, the Celery worker
(the only producer of the topic) is SIGSTOPped just before the kill until the checker and the consumer have read
everything the broker holds; then the broker is killed and the worker resumed at once, so the relay lives through
the whole outage (timeouts, backoff, a producer whose broker lost its state). `--ungated-broker-kill` skips that
(the checks then also count what the dev broker itself threw away).

With --cluster the broker is librdkafka's mock cluster of three brokers (chaos.mock_cluster) instead, behaving like
a real multi-broker cluster: partition leaders move every few seconds all run long, and the schedule injects
retriable produce errors, fatal idempotence errors, one broker down, consumer-group errors and every broker down
for three minutes, with the relay's default settings (nothing raised): no event may be dead-lettered.

Options for exploring one fault: `--faults broker,worker,...` (any order of worker, broker, consumer, database),
`--first-fault-at S`, `--broker-down S`, `--relay-hold S` (the relay stays stopped S more seconds before a broker
kill, so a backlog builds), `--kill-worker-with-broker`, `--drain-timeout S`, `--seed N`.
Logs of every process are in .run/chaos/<run id>/.
"""

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid

import MySQLdb
import redis

from chaos.checker import TopicChecker
from chaos.load import Load
from chaos.mock_cluster import MockCluster
from chaos.procs import (ROOT, VENV_BIN, AnotherRun, ChaosBroker, Proc, acquire_run_lock, forget_own_pids,
                         kill_leftovers, mariadb_ensure_running, mariadb_start, mariadb_stop)
from chaos.report import Database, build_report, expected_events, projection_mismatches
from tests.cdc_tools import BinlogDatabase
from tests.kafka_tools import free_port

TOPIC = "outbox.event.order"
TOPICS = (TOPIC, "outbox.dlq", "order-stats.dlq")
DATABASE_URL = "mysql://root@127.0.0.1:3306/orders_chaos"
CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
KEEP_LOGS = 5

FULL_FAULTS = ["worker", "broker", "consumer", "worker", "database", "broker", "consumer", "worker"]
QUICK_FAULTS = ["worker", "broker", "consumer", "database", "worker"]
# --compare: faults every variant lives through alike (the baseline publishes from the web process, so "web" is
# where its in-flight events are).
COMPARE_FAULTS = ["web", "broker", "database", "web", "broker"]
# A broker outage longer than the baseline's 3 attempts (2 s delivery timeout each, 1 s apart) take: a leader
# election, a rolling restart or a network partition often lasts that long.
COMPARE_BROKER_DOWN = 15.0
BASELINES = {"acks1": "1", "acksall": "all"}  # --baseline: chaos.direct_publish's CHAOS_DIRECT_PUBLISH_ACKS
VARIANTS = {"acks1": "(a) direct publish, acks=1", "acksall": "(b) direct publish, acks=all + idempotence",
            None: "(c) the outbox", "cdc": "(d) the outbox, relay_cdc"}

PRODUCT_ENV = {
    "DJANGO_DEBUG": "0",
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
    "KAFKA_CONSUMER_CONFIG": '{"session.timeout.ms": 6000}',
}
# Against the dev broker only: its kills are short, and the relay's settings are shortened to match.
DEV_BROKER_RELAY_ENV = {
    "OUTBOX_PUBLISH_TIMEOUT": "3",
    "OUTBOX_BACKOFF_BASE": "0.2",
    "OUTBOX_BACKOFF_MAX": "2",
    "OUTBOX_MAX_ATTEMPTS": "1000",
}

# --cluster: librdkafka's mock cluster of three brokers (chaos.mock_cluster), leaders moved every few seconds
# all run long, and these faults on the schedule; the relay runs with its default settings.
CLUSTER_FAULTS_QUICK = ["produce-errors", "broker-down", "fatal", "consumer-errors", "worker", "outage"]
CLUSTER_FAULTS_FULL = ["produce-errors", "broker-down", "fatal", "consumer-errors", "worker", "outage", "consumer",
                       "database", "fatal", "broker-down"]
CLUSTER_KINDS = {"produce-errors", "broker-down", "fatal", "consumer-errors", "outage"}
CLUSTER_BROKERS = 3
CLUSTER_PARTITIONS = 6


class Harness(Exception):
    """The run itself could not be carried out (not a finding about the product)."""


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


class ChaosRun:
    def __init__(self, args):
        self.args = args
        self.baseline = args.baseline  # None: the product; else the direct-publish baseline it replaces
        # --cdc: the product with relay_cdc publishing instead of the Celery relay, on a binlog MariaDB of the run's
        # own (the shared server has no binlog); the database fault restarts that one.
        self.binlog = BinlogDatabase() if args.cdc else None
        self.database_url = self.binlog.url if self.binlog else DATABASE_URL
        self.report = None
        self.run_id = time.strftime("%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.log_dir = ROOT / ".run" / "chaos" / self.run_id
        self.group_id = f"chaos-{self.run_id}"
        self.started = time.monotonic()
        self.t0: float | None = None  # when the load started
        self.db = Database(self.database_url)
        self.broker: ChaosBroker | None = None
        self.checker: TopicChecker | None = None
        self.load: Load | None = None
        self.procs: dict[str, Proc] = {}
        self.timeline: list[str] = []
        self.gate_notes: list[str] = []
        self._monitor_stop = threading.Event()
        self.env: dict = {}
        self.lock = None  # held for the whole run: one chaos run at a time on this machine
        self.down_brokers: set[int] = set()  # --cluster: brokers a fault has taken down
        self.leader_moves_done = 0

    # ------------------------------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        clock = f"t+{time.monotonic() - self.t0:6.1f}s" if self.t0 is not None else f"setup {time.monotonic() - self.started:5.1f}s"
        print(f"[chaos {clock}] {text}", flush=True)

    # ------------------------------------------------------------------------------------------ set-up

    def product_env(self, bootstrap: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("OUTBOX_", "INBOX_", "KAFKA_", "DJANGO_", "DATABASE_", "CELERY_", "IDEMPOTENCY_"))}
        env.update(PRODUCT_ENV)
        if not self.args.cluster:
            env.update(DEV_BROKER_RELAY_ENV)
        if self.baseline:
            env["CHAOS_DIRECT_PUBLISH_ACKS"] = BASELINES[self.baseline]
        env.update({
            "PYTHONPATH": str(ROOT),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "DATABASE_URL": self.database_url,
            "CELERY_BROKER_URL": CELERY_BROKER_URL,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "INBOX_GROUP_ID": self.group_id,
            "PYTHONUNBUFFERED": "1",
        })
        if self.binlog:
            env.update(self.binlog.env(), OUTBOX_RELAY_ENABLED="0")
        return env

    def manage(self, *argv: str, timeout: float = 300) -> str:
        result = subprocess.run([str(VENV_BIN / "python"), "manage.py", *argv], cwd=ROOT, env=self.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise Harness(f"manage.py {' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def prepare_database(self) -> str:
        """A fresh database of our own, migrated, with a user and a DRF token. Returns the token."""
        if self.binlog:
            self.binlog.install()
        else:
            connection = MySQLdb.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=10)
            try:
                connection.cursor().execute("DROP DATABASE IF EXISTS `orders_chaos`")
            finally:
                connection.close()
            subprocess.run([str(VENV_BIN / "python"), str(ROOT / "scripts" / "ensure_database.py")], cwd=ROOT,
                           env=self.env, check=True, stdout=subprocess.DEVNULL, timeout=60)
            self.manage("migrate", "--noinput")
        out = self.manage("shell", "-c", (
            "from django.contrib.auth import get_user_model\n"
            "from rest_framework.authtoken.models import Token\n"
            "user, _ = get_user_model().objects.get_or_create(username='chaos')\n"
            "token, _ = Token.objects.get_or_create(user=user)\n"
            "print('TOKEN', token.key)\n"
        ))
        return next(line.split()[1] for line in out.splitlines() if line.startswith("TOKEN "))

    def start_stack(self, port: int) -> None:
        def proc(name, *argv):
            self.procs[name] = Proc(name, list(argv), env=self.env, log_dir=self.log_dir)
            self.procs[name].start()

        wsgi = "chaos.direct_publish:application" if self.baseline else "project.wsgi"
        proc("web", str(VENV_BIN / "gunicorn"), wsgi, "--bind", f"127.0.0.1:{port}", "--workers", "2",
             "--access-logfile", "-")
        if self.binlog:
            proc("relay", str(VENV_BIN / "python"), "manage.py", "relay_cdc")
        elif not self.baseline:  # the baseline publishes from the web process: no relay
            proc("worker", str(VENV_BIN / "celery"), "-A", "project", "worker", "--loglevel", "INFO",
                 "--without-mingle", "--without-gossip", "--concurrency", "2")
            proc("beat", str(VENV_BIN / "celery"), "-A", "project", "beat", "--loglevel", "INFO",
                 "--schedule", str(self.log_dir / "celerybeat-schedule"))
        proc("consumer", str(VENV_BIN / "python"), "manage.py", "consume_events")
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/orders/", timeout=5)
            except urllib.error.HTTPError:
                return  # answering (401 without a token)
            except OSError:
                pass
            if not self.procs["web"].alive():
                raise Harness(f"gunicorn exited; see {self.procs['web'].log_path}")
            if time.monotonic() > deadline:
                raise Harness(f"gunicorn did not answer in 90 s; see {self.procs['web'].log_path}")
            time.sleep(0.3)

    # ------------------------------------------------------------------------------------------ watching

    def applied_ids(self) -> set[str]:
        return set(self.db.processed(self.group_id))

    def consumer_behind(self) -> int | None:
        """How many event ids the checker saw that the consumer has not applied (yet); None if unknown."""
        seen = {s.event_id for s in self.checker.snapshot()}
        try:
            return len(seen - self.applied_ids())
        except MySQLdb.Error:
            return None

    def monitor(self) -> None:
        while not self._monitor_stop.wait(10):
            try:
                pending = 0 if self.binlog else self.db.pending()  # relay_cdc marks nothing sent
                applied = len(self.applied_ids())
                db = f"pending={pending} applied={applied}"
            except Exception:
                db = "database unreachable"
            load = self.load
            cancelled = sum(1 for o in list(load.orders.values()) if o.cancelled)
            self.say(f"orders={len(load.orders)} cancelled={cancelled} unknown-retried={sum(load.unknown_by_kind.values())} "
                     f"seen-in-kafka={len(self.checker.records)} {db}")

    # ------------------------------------------------------------------------------------------ faults

    def _kill_and_restart(self, name: str) -> None:
        self.procs[name].kill()
        time.sleep(3)
        self.procs[name].start()

    def fault_worker(self) -> str:
        if self.binlog:
            self._kill_and_restart("relay")
            return "relay_cdc SIGKILLed, restarted after 3 s"
        self._kill_and_restart("worker")
        return "Celery worker process group SIGKILLed, restarted after 3 s"

    def fault_web(self) -> str:
        self._kill_and_restart("web")
        return "gunicorn process group (arbiter and workers) SIGKILLed mid-flight, restarted after 3 s"

    def fault_consumer(self) -> str:
        self._kill_and_restart("consumer")
        return "consumer SIGKILLed, restarted after 3 s"

    def fault_database(self) -> str:
        if self.binlog:
            begin = time.monotonic()
            self.binlog.stop()
            stopped = time.monotonic() - begin
            time.sleep(3)
            begin = time.monotonic()
            self.binlog.start()
            return (f"the run's binlog MariaDB shut down ({stopped:.1f} s), down 3 s, started again (answering after "
                    f"{time.monotonic() - begin:.1f} s)")
        begin = time.monotonic()
        mariadb_stop()
        stopped = time.monotonic() - begin
        time.sleep(3)
        begin = time.monotonic()
        mariadb_start()
        return f"MariaDB shut down ({stopped:.1f} s), down 3 s, started again (answering after {time.monotonic() - begin:.1f} s)"

    def fault_broker(self) -> str:
        # The process that produces to the topic.
        worker = self.procs["web" if self.baseline else "relay" if self.binlog else "worker"]
        gated = not self.args.ungated_broker_kill
        note = ""
        if gated:
            worker.signal_group(signal.SIGSTOP)
        try:
            if gated:
                begin = time.monotonic()
                deadline = begin + self.args.gate_timeout
                while True:
                    caught_up = self.checker.caught_up()
                    behind = self.consumer_behind() if caught_up else None
                    if caught_up and behind == 0:
                        note = f"gate: checker and consumer caught up in {time.monotonic() - begin:.1f} s; "
                        break
                    if time.monotonic() > deadline:
                        note = (f"gate TIMED OUT after {self.args.gate_timeout:.0f} s (checker caught up: {caught_up}, "
                                f"consumer behind by {behind} event(s)); ")
                        self.gate_notes.append(note)
                        break
                    time.sleep(0.3)
                if self.args.relay_hold:
                    time.sleep(self.args.relay_hold)  # a backlog builds while the relay stalls
                    note += f"relay held {self.args.relay_hold:g} s more; "
            self.checker.pause()
            self.broker.stop()
            if self.args.kill_worker_with_broker:
                worker.kill()
        finally:
            if gated:
                worker.signal_group(signal.SIGCONT)
        time.sleep(self.args.broker_down)
        begin = time.monotonic()
        self.broker.start()
        self.checker.resume()
        if self.args.kill_worker_with_broker:
            worker.start()
            note += "worker SIGKILLed with the broker and started with it (a fresh producer); "
        return (f"{note}broker SIGKILLed (its in-memory log, consumer-group offsets and producer state are gone), "
                f"down {self.args.broker_down:.0f} s, restarted empty with topics in {time.monotonic() - begin:.1f} s")

    # ------------------------------------------------------------------------------------------ cluster faults

    def move_leaders(self) -> None:
        """Every partition's leader to another broker that is up, every few seconds, all run long."""
        while not self._monitor_stop.wait(self.args.leader_moves):
            if len(self.down_brokers) < CLUSTER_BROKERS:
                try:
                    self.broker.move_leaders(avoid=sorted(self.down_brokers))
                    self.leader_moves_done += 1
                except Exception as exc:
                    self.say(f"leader move failed: {exc}")

    def fault_produce_errors(self) -> str:
        bursts = [["NOT_ENOUGH_REPLICAS"] * 10, ["REQUEST_TIMED_OUT"] * 10, ["NOT_LEADER_OR_FOLLOWER"] * 10,
                  ["NOT_ENOUGH_REPLICAS_AFTER_APPEND"] * 5]
        for burst in bursts:
            self.broker.call("push_errors", api="Produce", errors=burst)
            time.sleep(1.5)
        return "retriable produce errors: 10 NOT_ENOUGH_REPLICAS, 10 REQUEST_TIMED_OUT, 10 NOT_LEADER_OR_FOLLOWER, " \
               "5 NOT_ENOUGH_REPLICAS_AFTER_APPEND, in bursts 1.5 s apart"

    def fault_fatal(self) -> str:
        self.broker.call("push_errors", api="Produce", errors=["OUT_OF_ORDER_SEQUENCE_NUMBER"] * 3)
        time.sleep(3)
        self.broker.call("push_errors", api="Produce", errors=["UNKNOWN_PRODUCER_ID"] * 3)
        time.sleep(3)
        self.broker.call("push_errors", api="Produce", errors=["OUT_OF_ORDER_SEQUENCE_NUMBER"] * 3)
        return "fatal idempotence errors: 3 OUT_OF_ORDER_SEQUENCE_NUMBER, 3 UNKNOWN_PRODUCER_ID, 3 more " \
               "OUT_OF_ORDER_SEQUENCE_NUMBER, 3 s apart"

    def fault_broker_down(self) -> str:
        broker = 2
        self.down_brokers.add(broker)
        self.broker.call("broker_down", broker=broker)
        time.sleep(2)
        self.broker.move_leaders(avoid=[broker])  # the cluster elects other leaders
        time.sleep(6)
        self.broker.call("broker_up", broker=broker)
        self.down_brokers.discard(broker)
        return f"broker {broker} down (its partitions leaderless for 2 s, then led by the others), back after 8 s"

    def fault_outage(self) -> str:
        self.down_brokers.update(range(1, CLUSTER_BROKERS + 1))
        self.broker.call("broker_down", broker=-1)
        time.sleep(self.args.outage)
        self.broker.call("broker_up", broker=-1)
        self.down_brokers.clear()
        return f"every broker down for {self.args.outage:g} s"

    def fault_consumer_errors(self) -> str:
        self.broker.call("push_errors", api="OffsetCommit", errors=["NOT_COORDINATOR", "REBALANCE_IN_PROGRESS",
                                                                    "COORDINATOR_NOT_AVAILABLE"])
        self.broker.call("push_errors", api="Heartbeat", errors=["REBALANCE_IN_PROGRESS", "NOT_COORDINATOR"])
        self.broker.call("push_errors", api="Fetch", errors=["NOT_LEADER_OR_FOLLOWER", "UNKNOWN_TOPIC_OR_PART",
                                                             "REQUEST_TIMED_OUT"])
        time.sleep(3)
        self.broker.call("set_coordinator", group=self.group_id, broker=3)
        time.sleep(3)
        self.broker.call("push_errors", api="OffsetCommit", errors=["REBALANCE_IN_PROGRESS", "NOT_COORDINATOR"])
        return "consumer errors: OffsetCommit NOT_COORDINATOR/REBALANCE_IN_PROGRESS/COORDINATOR_NOT_AVAILABLE, " \
               "Heartbeat REBALANCE_IN_PROGRESS/NOT_COORDINATOR, Fetch NOT_LEADER/UNKNOWN_TOPIC/REQUEST_TIMED_OUT, " \
               "the group's coordinator moved to broker 3, two more commit errors"

    def schedule(self) -> list[tuple[float, str]]:
        default = (CLUSTER_FAULTS_QUICK if self.args.quick else CLUSTER_FAULTS_FULL) if self.args.cluster else (
            QUICK_FAULTS if self.args.quick else FULL_FAULTS)
        kinds = self.args.faults or default
        first, tail = self.args.first_fault_at, 12.0
        spacing = max((self.args.seconds - first - tail) / len(kinds), 4.0)
        return [(first + i * spacing, kind) for i, kind in enumerate(kinds)]

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> int:
        args = self.args
        try:
            self.lock = acquire_run_lock(
                timeout=args.wait_for_other_run,
                on_wait=lambda: print(f"[chaos] another chaos run is in progress; waiting up to "
                                      f"{args.wait_for_other_run:.0f} s for it to end", flush=True))
        except AnotherRun as exc:
            raise Harness(str(exc)) from None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        runs = sorted((d for d in self.log_dir.parent.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        for old in runs[:-KEEP_LOGS]:  # keep the logs of the last few runs only
            shutil.rmtree(old, ignore_errors=True)
        print(f"chaos run {self.run_id}: load {args.seconds:.0f} s at {args.rate:g} orders/s"
              f"{' (quick)' if args.quick else ''}; logs in {self.log_dir.relative_to(ROOT)}/", flush=True)
        if args.cluster:
            print(f"a mock cluster of {CLUSTER_BROKERS} brokers, leaders moved every {args.leader_moves:g} s; the relay's "
                  "default settings: no fault of this run may dead-letter anything; a dead-lettered or failed event "
                  "counts as a failure.", flush=True)
        else:
            print("OUTBOX_MAX_ATTEMPTS=1000 (backoff 0.2 s doubling up to 2 s, 3 s publish timeout): an outage of this "
                  "run must not dead-letter anything; a dead-lettered or failed event counts as a failure.", flush=True)
        if leftovers := kill_leftovers():
            self.say(f"killed process groups left by an earlier run: {leftovers}")
        if mariadb_ensure_running():
            self.say("MariaDB was not answering; started it")

        if args.cluster:
            self.broker = MockCluster(brokers=CLUSTER_BROKERS, topics={t: CLUSTER_PARTITIONS for t in TOPICS},
                                      log_path=self.log_dir / "mock-cluster.log")
            self.broker.start()
        else:
            self.broker = ChaosBroker(topics=TOPICS, log_dir=self.log_dir)
        self.env = self.product_env(self.broker.bootstrap)
        token = self.prepare_database()
        redis.Redis.from_url(CELERY_BROKER_URL).flushdb()
        if not args.cluster:
            self.broker.start()
        self.say(f"broker on {self.broker.bootstrap}, database orders_chaos migrated, consumer group {self.group_id}")

        self.checker = TopicChecker(self.broker.bootstrap, TOPIC)
        self.checker.start()
        port = free_port()
        self.start_stack(port)
        self.say(f"gunicorn answering on 127.0.0.1:{port}; worker, beat and consumer started")

        self.load = Load(port=port, token=token, rate=args.rate, run_id=self.run_id, seed=args.seed)
        self.load.start_workers()
        self.load.create_one()
        warm = time.monotonic()
        while True:  # the whole pipeline works before any fault: HTTP -> outbox -> relay -> Kafka -> consumer
            if self.load.orders and self.checker.records and self.applied_ids():
                break
            if self.load.unexpected or time.monotonic() - warm > 120:
                raise Harness(f"the warm-up order did not go through in 120 s: {self.load.unexpected}; "
                              f"see the logs in {self.log_dir}")
            time.sleep(0.2)
        self.say(f"warm-up order went through end to end in {time.monotonic() - warm:.1f} s")

        monitor = threading.Thread(target=self.monitor, name="monitor", daemon=True)
        if args.cluster and args.leader_moves > 0:
            threading.Thread(target=self.move_leaders, name="leader-moves", daemon=True).start()
        self.t0 = time.monotonic()
        self.load.start_creating()
        monitor.start()
        self.say(f"load started: {args.rate:g} orders/s, every 4th order cancelled 0.2-1.5 s after its 201")

        last_fault_end = 0.0
        for at, kind in self.schedule():
            delay = self.t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            begin = time.monotonic() - self.t0
            self.say(f"fault: {kind} ...")
            what = getattr(self, f"fault_{kind.replace('-', '_')}")()
            last_fault_end = time.monotonic() - self.t0
            line = f"t+{begin:6.1f}s .. {last_fault_end:6.1f}s  {kind:<9} {what}"
            self.timeline.append(line)
            self.say(f"fault: {kind} done: {what}")
        end = max(args.seconds, last_fault_end + 10)
        if (delay := self.t0 + end - time.monotonic()) > 0:
            time.sleep(delay)
        self.load.stop_creating()
        load_seconds = time.monotonic() - self.t0
        self.say(f"load stopped after {load_seconds:.0f} s; waiting for every request's outcome")
        if not self.load.wait_idle(300):
            self.say("some requests are still retrying after 300 s")
        self.load.close()

        drained = self.drain(args.drain_timeout)
        self._monitor_stop.set()

        self.say("reading the results")
        report = build_report(load=self.load, records=self.checker.snapshot(), db=self.db, group_id=self.group_id,
                              outbox=not self.baseline, marks_sent=not self.binlog)
        self.report = report
        return self.summary(report, drained=drained, load_seconds=load_seconds)

    def drain(self, timeout: float) -> str:
        """Wait until nothing is pending, the checker saw every committed event and the projection is the truth,
        and stays so; or until it is clear that it will not (stable but wrong), or the timeout."""
        begin = time.monotonic()
        expected = expected_events(self.load.orders)
        truth = self.load.truth_by_customer()
        last_projection, stable_since = None, time.monotonic()
        while time.monotonic() - begin < timeout:
            try:
                pending = 0 if self.binlog else self.db.pending()  # relay_cdc marks nothing sent
                projection = self.db.projection(self.load.customer_ids)
            except Exception:
                time.sleep(1)
                continue
            seen = {(s.key, s.event_type) for s in self.checker.snapshot()}
            if projection != last_projection:
                last_projection, stable_since = projection, time.monotonic()
            complete = pending == 0 and expected <= seen
            if complete and not projection_mismatches(truth, projection):
                time.sleep(5)  # stays so: no late double application
                if self.db.projection(self.load.customer_ids) == projection and (self.binlog or self.db.pending() == 0):
                    took = time.monotonic() - begin
                    self.say(f"drained in {took:.1f} s: nothing pending, every event seen, projection stable")
                    return f"drained in {took:.0f} s"
                continue
            if pending == 0 and time.monotonic() - stable_since > 20 and self.checker.caught_up():
                took = time.monotonic() - begin
                missing = len(expected - seen)
                self.say(f"nothing pending, the checker has read all the broker holds ({missing} committed event(s) "
                         f"not in it) and the projection has been stable, and wrong, for 20 s: stop waiting")
                return f"stable but wrong after {took:.0f} s"
            time.sleep(1)
        self.say(f"not drained after {timeout:.0f} s")
        return f"NOT drained after {timeout:.0f} s"

    def summary(self, report, *, drained: str, load_seconds: float) -> int:
        took = time.monotonic() - self.started
        print("\n" + "=" * 100)
        variant = (f"{VARIANTS['cdc' if self.binlog else self.baseline]}  "
                   if self.args.compare or self.baseline or self.binlog else "")
        print(f"CHAOS RUN {self.run_id}  {variant}({'quick' if self.args.quick else 'full'}; load {load_seconds:.0f} s at "
              f"{self.args.rate:g} orders/s; {drained}; total {took:.0f} s)")
        print("=" * 100)
        print("faults:")
        for line in self.timeline:
            print("  " + line)
        starts = ", ".join(f"{name} started {p.starts}x" for name, p in self.procs.items())
        print(f"processes: {starts}; broker lives: {self.checker.epoch}")
        if self.args.cluster:
            worker_log = self.procs["worker"].log_path.read_text(errors="replace")
            print(f"cluster: {self.leader_moves_done} leader moves; the worker's producer rebuilt "
                  f"{worker_log.count('discarding the Kafka producer and building a new one')} time(s), after "
                  f"{worker_log.count('building a new one: fatal error')} fatal error(s)")
        if self.gate_notes:
            print("gate notes: " + " | ".join(self.gate_notes))
        print("http answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.load.counts.items())))
        print()
        print(report.table())
        for line in report.details:
            print("  - " + line)
        lost = report.figure("LOST: orders with events missing in Kafka")
        verdict = "PASS" if report.passed else "FAIL"
        print()
        print(f"CHAOS RESULT: {verdict} lost={lost} "
              f"duplicates={report.figure('events seen more than once')} "
              f"order_violations={report.figure('per-order order violations in Kafka')} "
              f"not_applied={report.figure('committed events not applied by the consumer')} "
              f"projection_mismatches={report.figure('projection rows differing from the truth')} "
              f"pending={report.figure('outbox rows left pending')} duration={took:.0f}s", flush=True)
        return 0 if report.passed else 1

    # ------------------------------------------------------------------------------------------ teardown

    def cleanup(self) -> None:
        self._monitor_stop.set()
        if self.load is not None:
            try:
                self.load.close()
            except Exception:
                traceback.print_exc()
        for proc in self.procs.values():
            try:
                proc.stop()
            except Exception:
                traceback.print_exc()
        if self.checker is not None:
            try:
                self.checker.stop()
            except Exception:
                traceback.print_exc()
        if self.broker is not None:
            try:
                self.broker.stop()
            except Exception:
                traceback.print_exc()
        if self.binlog is not None:
            self.binlog.destroy()
        if self.lock is None:
            return  # another run holds the machine: nothing of ours to clean up
        try:
            if mariadb_ensure_running():
                print("[chaos] MariaDB was down at the end; started it again", flush=True)
        except Exception:
            traceback.print_exc()
            print("[chaos] could not make sure MariaDB is running: start it with "
                  "`start-stop-daemon --start --oknodo --background --pidfile /run/mysqld/mysqld.pid "
                  "--exec /usr/sbin/mariadbd`", flush=True)
        forget_own_pids()
        if self.lock is not None:
            self.lock.close()  # releases the run lock


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="about 70 s of load, every fault kind at least once (for CI)")
    parser.add_argument("--seconds", type=float, help="seconds of load (default 180, or 70 with --quick)")
    parser.add_argument("--rate", type=float, default=20.0, help="orders created per second (default 20)")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the drain")
    parser.add_argument("--broker-down", type=float,
                        help=f"seconds the broker stays dead (default 5; {COMPARE_BROKER_DOWN:g} with --compare)")
    parser.add_argument("--gate-timeout", type=float, default=45.0,
                        help="seconds to wait for checker and consumer to catch up before a broker kill")
    parser.add_argument("--relay-hold", type=float, default=0.0,
                        help="keep the relay stopped this many more seconds before a broker kill (a backlog builds)")
    parser.add_argument("--kill-worker-with-broker", action="store_true",
                        help="SIGKILL the Celery worker with the broker and start it again with it")
    parser.add_argument("--ungated-broker-kill", action="store_true",
                        help="kill the broker without pausing the relay first (measures the dev broker's "
                             "in-memory loss too)")
    parser.add_argument("--wait-for-other-run", type=float, default=150.0,
                        help="seconds to wait for a chaos run in progress (they share the database) to end")
    parser.add_argument("--seed", type=int, default=0, help="seed for the order contents")
    parser.add_argument("--faults", type=lambda v: [k.strip() for k in v.split(",") if k.strip()],
                        help="comma-separated fault kinds in order (worker, broker, consumer, database) "
                             "instead of the default schedule")
    parser.add_argument("--first-fault-at", type=float, default=6.0, help="seconds of load before the first fault")
    parser.add_argument("--cluster", action="store_true",
                        help="against librdkafka's mock cluster of three brokers instead of the dev broker: leaders "
                             "moved all run long; faults produce-errors, broker-down, fatal, consumer-errors, outage "
                             "(and worker, consumer, database); the relay's default settings")
    parser.add_argument("--outage", type=float, default=180.0,
                        help="--cluster: seconds every broker stays down in the outage fault (default 180)")
    parser.add_argument("--leader-moves", type=float, default=3.0,
                        help="--cluster: seconds between leader moves (0: none)")
    parser.add_argument("--baseline", choices=sorted(BASELINES),
                        help="run the approach the product replaces instead (chaos.direct_publish: commit, then "
                             "publish from a thread of the web process) with acks=1 or acks=all + idempotence")
    parser.add_argument("--cdc", action="store_true",
                        help="the outbox published by relay_cdc (Debezium) instead of the Celery relay, on a binlog "
                             "MariaDB of the run's own; the worker fault kills relay_cdc, the database fault restarts "
                             "that server")
    parser.add_argument("--compare", action="store_true",
                        help="run (a) the baseline with acks=1, (b) with acks=all + idempotence, (c) the outbox, "
                             "(d) the outbox published by relay_cdc, under the same faults (default "
                             f"{','.join(COMPARE_FAULTS)}), and print them side by side")
    args = parser.parse_args(argv)
    kinds = {"worker", "consumer", "database", "web"} | (CLUSTER_KINDS if args.cluster else {"broker"})
    unknown = set(args.faults or []) - kinds
    if unknown:
        parser.error(f"unknown fault kind(s){' with --cluster' if args.cluster else ''}: {', '.join(sorted(unknown))}")
    if args.cluster and (args.baseline or args.compare or args.cdc):
        parser.error("--cluster runs the outbox with the Celery relay only")
    if args.cdc and args.baseline:
        parser.error("--cdc runs the outbox, not a baseline")
    if (args.baseline or args.compare) and "worker" in (args.faults or []):
        parser.error("the baseline has no Celery worker to kill: use the web fault")
    if args.broker_down is None:
        args.broker_down = COMPARE_BROKER_DOWN if args.compare else 5.0
    if args.seconds is None:
        args.seconds = 70.0 if args.quick else 180.0
    return args


def compare(args) -> int:
    """The three variants one after the other, same load, seed and faults; exit 0 when the outbox's must-be-zero
    figures are all 0 (the baselines' figures are whatever they are)."""
    args.faults = args.faults or COMPARE_FAULTS
    reports = {}
    for variant in ("acks1", "acksall", None, "cdc"):
        args.baseline, args.cdc = (None, True) if variant == "cdc" else (variant, False)
        run = ChaosRun(args)
        try:
            run.run()
        except Harness as exc:
            print(f"[chaos] the {VARIANTS[variant]} run could not be carried out: {exc}", flush=True)
            return 2
        finally:
            run.cleanup()
        reports[variant] = run.report
    print("\n" + "=" * 100)
    print(f"CHAOS COMPARISON (load {args.seconds:.0f} s at {args.rate:g} orders/s each; faults "
          f"{', '.join(args.faults)}; the same checker for all four)")
    print("=" * 100)
    print(comparison_table(reports))
    passed = reports[None].passed and reports["cdc"].passed
    print(f"\nCHAOS COMPARISON RESULT: {'PASS' if passed else 'FAIL'} (the outbox's must-be-zero figures, with either "
          "relay)")
    return 0 if passed else 1


def comparison_table(reports: dict) -> str:
    names = list(next(iter(reports.values())).comparison)
    columns = [VARIANTS[b] for b in reports]
    width = max(len(n) for n in names)
    lines = ["| " + " | ".join(["".ljust(width), *columns]) + " |",
             "|" + "|".join(["-" * (width + 2), *("-" * (len(c) + 2) for c in columns)]) + "|"]
    for name in names:
        cells = [str(r.comparison[name]).rjust(len(c)) for r, c in zip(reports.values(), columns)]
        lines.append("| " + " | ".join([name.ljust(width), *cells]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.compare:
        try:
            return compare(args)
        except (KeyboardInterrupt, SystemExit) as exc:
            print(f"[chaos] interrupted ({exc!r})", flush=True)
            return 130
    run = ChaosRun(args)
    code = 2
    try:
        code = run.run()
    except Harness as exc:
        print(f"[chaos] the run could not be carried out: {exc}", flush=True)
    except (KeyboardInterrupt, SystemExit) as exc:
        print(f"[chaos] interrupted ({exc!r}); cleaning up", flush=True)
        code = 130
    except Exception:
        traceback.print_exc()
    finally:
        run.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
