"""The consumer, as deployed (`manage.py consume_events` subprocesses): apply rate of a backlog against the relay's
drain of the same events and a raw-SQL ceiling of the same writes, commit-to-projection latency over HTTP, and RSS
over a long backlog.

Each consumer run reads a topic of its own (OUTBOX_TOPIC_PREFIX for the relay, INBOX_TOPICS for the consumer) with
a fresh group: a fresh group starts at the topic's beginning, and the shared `outbox.event.order` already holds the
drain benchmark's messages. (Positioning a group at the end by committing the high watermarks does not work on
Tansu: the high watermarks it reports are below the last offsets.)
"""

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal

from django.db import connection, transaction

from bench import backlog
from bench.common import BENCH_DB, ROOT
from bench.memory import rss_kib
from bench.processes import in_processes
from bench.stack import process_env

BATCH = 500  # INBOX_BATCH_SIZE's default: the ceiling writes the same batches
LOG = ROOT / ".run" / "bench-consumer.log"


def fresh_topic(broker) -> str:
    """A new topic with the same partition count as the deployed one; returns its name."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    broker.create_topics(prefix + "order")
    return prefix + "order"


def topic_env(topic: str, **more) -> dict:
    prefix = topic[: -len("order")]
    return process_env(OUTBOX_TOPIC_PREFIX=prefix, INBOX_TOPICS=topic, **more)


def clean_inbox() -> None:
    """Empty the consumer's tables so that every run starts from the same state. TRUNCATE: a million rows in
    seconds, where DELETE takes minutes. Only ever on the bench database."""
    from inbox.models import ConsumerDeadLetter, ProcessedEvent
    from stats.models import CustomerStats

    assert connection.settings_dict["NAME"] == BENCH_DB, connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        for model in (ProcessedEvent, ConsumerDeadLetter, CustomerStats):
            cursor.execute(f"TRUNCATE TABLE {model._meta.db_table}")


def processed_count(group_id: str) -> int:
    from inbox.models import ProcessedEvent

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {ProcessedEvent._meta.db_table} WHERE group_id = %s", [group_id])
        return cursor.fetchone()[0]


def start_consumer(env: dict) -> subprocess.Popen:
    with open(LOG, "ab") as log:  # a file, not a pipe nobody reads while the consumer logs
        return subprocess.Popen([sys.executable, "manage.py", "consume_events"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def stop_consumer(process: subprocess.Popen) -> None:
    """SIGTERM, as a deployment stops it: it must finish its batch, commit and exit 0."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"consume_events did not exit within 30 s of SIGTERM; see {LOG}")
    if code != 0:
        raise RuntimeError(f"consume_events exited {code} after SIGTERM; see {LOG}")


class CommittedOffsets:
    """How far a group has applied a topic, read off the broker: the sum of its committed offsets. The consumer
    commits a batch's offsets right after its database commit, so this counts applied events without putting a
    query on the database under test (counting the processed-event rows every 0.2 s did: a COUNT(*) over a
    growing index, competing with the consumer's writes for the same server)."""

    def __init__(self, topic: str, group_id: str):
        from inbox.kafka import TopicPartition, build_offsets_reader  # the lag gauge's reader: never joins the group

        self._reader = build_offsets_reader(group_id=group_id)
        partitions = self._reader.list_topics(topic, timeout=10).topics[topic].partitions
        self._partitions = [TopicPartition(topic, p) for p in partitions]

    def __call__(self) -> int:
        return sum(max(tp.offset, 0) for tp in self._reader.committed(self._partitions, timeout=10))

    def close(self) -> None:
        self._reader.close()


def wait_until_applied(group_id: str, n: int, processes: list[subprocess.Popen], *, started: float, timeout: float,
                       topic: str, interval: float = 0.2, sample=None) -> dict:
    """Poll the group's committed offsets until they cover n events (bounded by timeout), then check that the
    database holds n processed events. Times are from `started`. `sample(count, processes)` is called at each
    poll (the RSS run samples the process there)."""
    first = None
    applied = CommittedOffsets(topic, group_id)
    try:
        while True:
            count = applied()
            elapsed = time.perf_counter() - started
            if sample:
                sample(count, processes)
            if count and first is None:
                first = (elapsed, count)
            if count >= n:
                break
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"consume_events exited {process.returncode} at {count}/{n}; see {LOG}")
            if elapsed > timeout:
                raise RuntimeError(f"consume_events applied only {count}/{n} in {timeout:.0f} s; see {LOG}")
            time.sleep(interval)
    finally:
        applied.close()
    recorded = processed_count(group_id)
    if recorded != n:
        raise RuntimeError(f"offsets committed past {n} events, but {recorded} are recorded as applied")
    return {"seconds": elapsed, "first_applied_s": first[0], "first_count": first[1]}


def run_consumers(env: dict, group_id: str, n: int, processes: int, **wait) -> dict:  # wait: of wait_until_applied
    """Start `processes` consume_events of one group on a backlog of n events, time them until all n are applied
    (from the start of the processes: start-up and the group join are part of it), then SIGTERM them."""
    started = time.perf_counter()
    running = [start_consumer(env) for _ in range(processes)]
    try:
        timing = wait_until_applied(group_id, n, running, started=started, topic=env["INBOX_TOPICS"], **wait)
    finally:
        for process in running:
            if process.poll() is None:
                stop_consumer(process)
            elif process.returncode != 0:
                raise RuntimeError(f"consume_events exited {process.returncode}; see {LOG}")
    return timing


def ceiling_events(topic: str) -> list[tuple]:
    """The outbox's events as the consumer reads them, for the ceiling (outside its clock: the ceiling is the
    database's): (event id with dashes, type, customer, total, partition, offset), in id order."""
    from outbox.models import OutboxEvent

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT event_id, event_type, payload, kafka_partition, kafka_offset "
                       f"FROM {OutboxEvent._meta.db_table} ORDER BY id")
        rows = cursor.fetchall()
    events = []
    for event_id, event_type, payload, partition, offset in rows:
        data = json.loads(payload)
        # The id as the consumer records it (inbound_event_parse writes UUIDs with dashes).
        events.append((str(uuid.UUID(event_id)), event_type, data["customer_id"], Decimal(data["total"]),
                       partition, offset))
    return events


def ceiling_write(events: list[tuple], topic: str, group_id: str) -> int:
    """The consumer's writes for `events` with nothing else, on one connection: per batch of 500, one multi-row
    INSERT of the processed-event rows (also the consumer's dedupe when every id is new), the stats projection's
    upsert, COMMIT. Folding a batch into per-customer changes is part of building the upsert: it is timed."""
    from inbox.models import ProcessedEvent
    from ops.db import db_datetime, sql_literals
    from stats.handlers import stats_upsert_sql  # the projection's own statement

    table, quote = ProcessedEvent._meta.db_table, connection.ops.quote_name
    insert = (f"INSERT INTO {table} (group_id, event_id, event_type, topic, {quote('partition')}, {quote('offset')}, "
              f"processed_at) VALUES ")
    for start in range(0, len(events), BATCH):
        batch = events[start:start + BATCH]
        now = db_datetime(datetime.now(timezone.utc))
        changes = defaultdict(lambda: [0, 0, Decimal("0")])
        for _, event_type, customer, total, _, _ in batch:
            change = changes[customer]
            created = event_type == "OrderCreated"
            change[0 if created else 1] += 1
            change[2] += total if created else -total
        # Values written into the statements as the consumer writes them (ops.db.sql_literals).
        sql_literal = sql_literals()
        ids = [sql_literal(e[0]) for e in batch]
        group, at = sql_literal(group_id), sql_literal(now)
        kinds = {kind: sql_literal(kind) for kind in ("OrderCreated", "OrderCancelled")}
        topic_literal = sql_literal(topic)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(insert + ",".join(
                f"({group},{event_id},{kinds[e[1]]},{topic_literal},{int(e[4])},{int(e[5])},{at})"
                for event_id, e in zip(ids, batch)))
            cursor.execute(stats_upsert_sql(sql_literal, changes, now=at))
    return len(events)


def raw_sql_ceiling(events: list[tuple], topic: str, processes: int) -> dict:
    """ceiling_write in `processes` processes of one group side by side, each the events of its share of the
    partitions (as the consumers of a group share them): events/s."""
    group_id = f"bench-{uuid.uuid4().hex[:8]}"  # as long as the consumer runs' group ids: same index entries
    shares = [[e for e in events if e[4] % processes == i] for i in range(processes)]
    counts, seconds, database_cpu = in_processes([(ceiling_write, (share, topic, group_id)) for share in shares])
    if processed_count(group_id) != len(events) or sum(counts) != len(events):
        raise RuntimeError("the ceiling did not record every event")
    return {"rate": len(events) / seconds, "database_cpu_ms_per_1000": database_cpu / len(events) * 1e6}


def apply_rate(n: int, broker, *, token: str) -> dict:
    """All in one step, on the same backlog (bench.backlog: written through the API): the relay as deployed drains
    it to a topic of its own; one, then two consume_events apply it; the raw-SQL ceiling writes the same in one,
    then two processes. Each consumer figure is compared with the relay's drain of this step and with the
    ceiling of as many connections as it has processes."""
    from bench.deployed import deployed

    backlog.ensure(n, token=token)
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    relay = deployed(n, broker, prefix=prefix)
    topic = prefix + "order"
    events = ceiling_events(topic)
    results = {"events": n, "relay_rate": relay["rate"]}
    for processes in (1, 2):
        clean_inbox()  # every run starts from empty tables
        group_id = f"bench-{uuid.uuid4().hex[:8]}"
        timing = run_consumers(topic_env(topic, INBOX_GROUP_ID=group_id), group_id, n, processes,
                               timeout=120 + n / 500)
        rate = n / timing["seconds"]
        after_first = timing["seconds"] - timing["first_applied_s"]
        # The rate once the group was joined and applying (the join is paid once per process start).
        rate_after_first = (n - timing["first_count"]) / after_first if after_first > 0 else rate
        results[f"consumer_{processes}"] = {**timing, "rate": rate, "rate_after_first": rate_after_first}
        clean_inbox()
        results[f"raw_sql_{processes}"] = raw_sql_ceiling(events, topic, processes)
    clean_inbox()
    backlog.empty_outbox()
    return results


# Seeing an order means polling its customer until the count moves: pending orders / poll interval GETs a second,
# each a few ms of CPU. Tracking all 200 orders/s at a few ms would take more CPU than the 2 cores have, so every
# k-th order is tracked (a uniform sample), about TRACKED_PER_S a second; all of them are posted.
TRACKED_PER_S = 20
POLLERS = 2  # threads polling the stats endpoint; each polls its pending orders in turn
POLL_PAUSE = 0.002  # between two rounds of a poller's pending orders
GIVE_UP = 10.0  # seconds after its 201: an order not seen by then counts as not seen
READER_PORT_OFFSET = 1  # the pollers' own gunicorn: port + 1


def projection_latency(*, port: int, reader_port: int, token: str, rate: int, seconds: float) -> dict:
    """POST orders at a steady rate, each for a customer of its own, and for every k-th measure from its 201 until
    GET /api/customers/<customer>/stats/ counts it. Time of sight is when that GET's answer arrived (an upper
    bound, late by at most one GET plus one round of the poller's other pending orders)."""
    from bench.http_load import ORDER, percentile

    run = uuid.uuid4().hex[:8]
    track_every = max(1, round(rate / TRACKED_PER_S))
    auth = {"Authorization": f"Token {token}"}
    pending = [queue.SimpleQueue() for _ in range(POLLERS)]  # (customer, answered at) handed to each poller
    latencies, unseen, errors, gets = [], [], [], [0] * POLLERS
    posted = threading.Event()

    def poll(index: int) -> None:
        # gunicorn's sync workers close every connection: http.client reconnects transparently.
        reader = http.client.HTTPConnection("127.0.0.1", reader_port, timeout=10)
        mine: dict[str, float] = {}
        while True:
            while not pending[index].empty():
                customer, answered = pending[index].get()
                mine[customer] = answered
            if not mine and posted.is_set() and pending[index].empty():
                return
            for customer, answered in list(mine.items()):
                reader.request("GET", f"/api/customers/{customer}/stats/", headers=auth)
                response = reader.getresponse()
                body = response.read()
                seen = time.monotonic()
                gets[index] += 1
                if response.status == 200 and json.loads(body)["orders_created"] >= 1:
                    latencies.append(seen - answered)
                    del mine[customer]
                elif seen - answered > GIVE_UP:
                    unseen.append(customer)
                    del mine[customer]
            time.sleep(POLL_PAUSE)

    total, threads = max(1, int(rate * seconds)), 16  # enough to keep the rate while POSTs slow down under load
    start = time.monotonic() + 0.2

    def post(index: int) -> None:
        web = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {**auth, "Content-Type": "application/json"}
        for n in range(index, total, threads):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            customer = f"lat-{run}-{n}"
            web.request("POST", "/api/orders/", body=json.dumps({**ORDER, "customer_id": customer}), headers=headers)
            response = web.getresponse()
            response.read()
            if response.status != 201:
                errors.append(response.status)
            elif n % track_every == 0:
                pending[n // track_every % POLLERS].put((customer, time.monotonic()))

    pollers = [threading.Thread(target=poll, args=(i,)) for i in range(POLLERS)]
    posters = [threading.Thread(target=post, args=(i,)) for i in range(threads)]
    for thread in pollers + posters:
        thread.start()
    for thread in posters:
        thread.join()
    sent_in = time.monotonic() - start
    posted.set()
    for thread in pollers:
        thread.join()
    polled_for = time.monotonic() - start
    # An order never seen counts, as an infinite latency: in the percentiles, not dropped from them.
    ms = [v * 1000 for v in latencies] + [float("inf")] * len(unseen)
    return {
        "orders": total, "errors": len(errors), "achieved_rate": total / sent_in,
        "track_every": track_every, "tracked": len(range(0, total, track_every)), "seen": len(latencies),
        "unseen": len(unseen),
        "gets_per_s": sum(gets) / polled_for,
        "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99), "max_ms": max(ms),
    }


def latency(*, port: int, token: str, rate: int, seconds: float, broker) -> dict:
    """The whole pipeline as deployed (gunicorn, Celery worker and beat, consume_events), on a topic of its own.
    The pollers read through a gunicorn of their own (same app, same database): on the 4 sync workers the POSTs
    keep busy, a GET would wait its turn, and that wait is the load generator's, not the pipeline's."""
    from bench.stack import Stack

    topic = fresh_topic(broker)
    stack = Stack(port=port, consumer=True, OUTBOX_TOPIC_PREFIX=topic[: -len("order")], INBOX_TOPICS=topic,
                  INBOX_GROUP_ID=f"bench-{uuid.uuid4().hex[:8]}")
    reader_port = port + READER_PORT_OFFSET
    try:
        readers = Stack(port=reader_port, relay=False, web_workers=2)
    except BaseException:
        stack.stop()
        raise
    try:
        # One order first, until seen: the consumer has joined its group (seconds) and every process is warm.
        for _ in range(6):
            if projection_latency(port=port, reader_port=reader_port, token=token, rate=1, seconds=1)["seen"]:
                break
        else:
            raise RuntimeError("no order reached the stats endpoint in a minute; see .run/bench-stack.log")
        result = projection_latency(port=port, reader_port=reader_port, token=token, rate=rate, seconds=seconds)
    finally:
        readers.stop()
        stack.stop()
    if stack.consumer.returncode != 0:
        raise RuntimeError(f"consume_events exited {stack.consumer.returncode} on SIGTERM; see .run/bench-stack.log")
    return result


def produce_backlog(topic: str, n: int, bootstrap: str) -> None:
    """n distinct events straight to the topic, as the relay writes them (its Claimed.message(): key, JSON value,
    every header; the relay's partitioner; ~40% of orders cancelled), without the relay: the RSS run measures
    the consumer."""
    from confluent_kafka import Producer

    from relay.claim import Claimed

    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20,
                         "enable.idempotence": True, "acks": "all"})
    failed = []
    occurred = datetime.now(timezone.utc).replace(tzinfo=None)
    produced = order = 0
    while produced < n:
        order += 1
        payload = ('{"order_id": "%d", "customer_id": "c-%d", "total": "19.98", "items": [%s]}'
                   % (order, order % 1000, ", ".join(['{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}'] * 2)))
        for event_type in ("OrderCreated", "OrderCancelled")[: 2 if order % 5 < 2 else 1][: n - produced]:
            message = Claimed(id=produced, event_id=str(uuid.uuid4()), aggregate_type="order", aggregate_id=str(order),
                              event_type=event_type, payload=payload, occurred_at=occurred, attempts=0,
                              topic=topic).message()
            while True:
                try:
                    producer.produce(message.topic, key=message.key, value=message.value, headers=message.headers,
                                     on_delivery=lambda err, _msg: err and failed.append(err))
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.1)
            produced += 1
        producer.poll(0)
    if producer.flush(120) or failed:
        raise RuntimeError(f"backlog not produced: {failed[:3]}")


def rss(n: int, broker) -> dict:
    """VmRSS of one consume_events process, sampled every second while it applies a backlog of n events."""
    topic = fresh_topic(broker)
    produce_backlog(topic, n, broker.bootstrap)
    clean_inbox()
    group_id = f"bench-{uuid.uuid4().hex[:8]}"
    samples = []  # (events applied, rss KiB)

    def sample(count: int, processes: list[subprocess.Popen]) -> None:
        samples.append((count, rss_kib(processes[0].pid)))

    timing = run_consumers(topic_env(topic, INBOX_GROUP_ID=group_id), group_id, n, 1, timeout=300 + n / 200,
                           interval=1.0, sample=sample)
    clean_inbox()
    # Before its first batch the process is still starting (a few MiB): those samples say nothing. A quick run may
    # pass 10% between two samples: then the first sample after the first batch stands for the first 10%.
    applied = [(count, kib) for count, kib in samples if count > 0]
    early = [kib for count, kib in applied if count <= n * 0.1] or [applied[0][1]]
    late = [kib for count, kib in applied if count >= n * 0.9] or [applied[-1][1]]
    return {
        "events": n, "seconds": timing["seconds"],
        "rss_mib_first_10pct": max(early) / 1024, "rss_mib_last_10pct": max(late) / 1024,
        "rss_mib_peak": max(kib for _, kib in samples) / 1024,
        # The verdict's figures: the consumer's RSS moves in steps of a few MiB both ways as it applies (the
        # allocator's arenas, librdkafka's prefetch queue), so a 10% window can catch a low step early and a high
        # one late. Flat means the second half never goes higher than the first half went.
        "rss_mib_first_half_peak": max(kib for count, kib in applied if count <= n / 2) / 1024,
        "rss_mib_second_half_peak": max(kib for count, kib in applied if count > n / 2) / 1024,
    }


if __name__ == "__main__":  # the apply-rate runs alone: python -m bench.consume [events]
    from bench.common import setup_django, start_broker

    broker = start_broker()
    try:
        setup_django()
        from bench.common import bench_user_token

        print(apply_rate(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, broker, token=bench_user_token()))
    finally:
        broker.stop()
