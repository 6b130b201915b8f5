"""relay_cdc for real: its own binlog MariaDB (tests/cdc_tools.py), its own broker, the command as deployed.

Each test starts from an empty outbox and no recorded position, and reads back only its own orders' messages.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from tests.cdc_tools import PROJECT, BinlogDatabase, outbox_insert
from tests.kafka_tools import Broker, read_topic

pytestmark = pytest.mark.cdc

TOPIC, DLQ, HISTORY_TOPIC = "outbox.event.order", "outbox.dlq", "orders-cdc.schema-history"
LOGS = PROJECT / ".run"


@pytest.fixture(scope="module")
def binlog_db():
    db = BinlogDatabase()
    db.install()
    yield db
    db.destroy()


@pytest.fixture(scope="module")
def cdc_broker():
    broker = Broker(topics=(TOPIC, DLQ))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def cdc(binlog_db, cdc_broker):
    """A clean slate (no rows, no position, no schema history), and a way to start relay_cdc processes."""
    binlog_db.reset()
    delete_history(cdc_broker)
    started: list[subprocess.Popen] = []

    def start(**env: str) -> subprocess.Popen:
        log = open(LOGS / f"test-relay-cdc-{uuid.uuid4().hex[:8]}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "manage.py", "relay_cdc"], cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "LOG_FORMAT": "plain",
                 "KAFKA_BOOTSTRAP_SERVERS": cdc_broker.bootstrap, "OUTBOX_BACKOFF_MAX": "2",
                 **binlog_db.env(), **env},
        )
        process.log_path = pathlib.Path(log.name)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def delete_history(broker) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    try:
        admin.delete_topics([HISTORY_TOPIC])[HISTORY_TOPIC].result(10)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise


def published(broker, keys, *, count: int, timeout: float = 60.0):
    """The records of these orders, once `count` distinct event ids are among them."""
    return read_topic(broker.bootstrap, TOPIC, keys=set(keys), timeout=timeout,
                      until=lambda records: len({r.headers["id"] for r in records}) >= count)


def test_a_row_is_published_byte_for_byte_as_the_celery_relay_publishes_it(cdc, binlog_db, cdc_broker):
    keys = [f"same-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)]
    with binlog_db.connect() as db:
        events = [
            outbox_insert(db, order_id=keys[0]),
            outbox_insert(db, order_id=keys[1], payload={"order_id": keys[1], "customer_id": "Zoë ✓ 😀",
                                                         "items": [{"sku": "A-1", "quantity": 2}], "total": "0.10"}),
            outbox_insert(db, order_id=keys[2], trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                          trace_state="congo=t61rcWkgMzE"),
            outbox_insert(db, order_id=keys[3], occurred_at=datetime(2026, 1, 2, 3, 4, 5)),
            outbox_insert(db, order_id=keys[4], event_type="OrderCancelled"),
        ]
    relay_cdc = cdc()  # the snapshot publishes these
    with binlog_db.connect() as db:
        events.append(outbox_insert(db, order_id=keys[5], payload='{"order_id":"compact" ,  "spacing": [1,2]}'))
    published(cdc_broker, keys, count=len(events))  # ... and the binlog that one
    relay_cdc.send_signal(signal.SIGTERM)
    assert relay_cdc.wait(60) == 0

    # The Celery relay's code publishes the same rows (still pending: CDC marks nothing).
    subprocess.run([sys.executable, "manage.py", "relay_outbox", "--until-empty"], cwd=PROJECT, check=True,
                   env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                        "KAFKA_BOOTSTRAP_SERVERS": cdc_broker.bootstrap, "DATABASE_URL": binlog_db.url})

    records = read_topic(cdc_broker.bootstrap, TOPIC, keys=set(keys), timeout=30,
                         until=lambda records: len(records) >= 2 * len(events))
    by_id = defaultdict(list)
    for record in records:
        by_id[record.headers["id"]].append(record)
    assert sorted(by_id) == sorted(events)
    for event_id, (from_cdc, from_relay) in by_id.items():
        assert (from_cdc.topic, from_cdc.partition, from_cdc.key, from_cdc.value, from_cdc.raw_headers) == (
            from_relay.topic, from_relay.partition, from_relay.key, from_relay.value, from_relay.raw_headers)
    traced = by_id[events[2]][0].headers
    assert (traced["traceparent"], traced["tracestate"]) == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "congo=t61rcWkgMzE")
    assert "traceparent" not in by_id[events[0]][0].headers
    assert by_id[events[5]][0].value == b'{"order_id":"compact" ,  "spacing": [1,2]}'


def test_killed_mid_stream_it_resumes_from_its_last_recorded_position(cdc, binlog_db, cdc_broker):
    key_prefix = f"kill-{uuid.uuid4().hex[:8]}"
    keys = [f"{key_prefix}-{i}" for i in range(50)]
    relay_cdc = cdc()
    events = []
    with binlog_db.connect() as db:
        for n in range(1500):
            events.append(outbox_insert(db, order_id=keys[n % len(keys)],
                                        payload={"order_id": keys[n % len(keys)], "n": n}))
            if n == 300:
                published(cdc_broker, keys, count=200)  # streaming; now kill it in the middle of the stream
                time.sleep(1.5)  # a position or two recorded (OUTBOX_CDC_POSITION_EVERY)
                relay_cdc.send_signal(signal.SIGKILL)
                relay_cdc.wait(30)
                relay_cdc = cdc()
    records = published(cdc_broker, keys, count=len(events), timeout=120)
    ids = Counter(r.headers["id"] for r in records)
    assert set(ids) == set(events)  # never a gap
    assert sum(ids.values()) - len(ids) < 300  # duplicates since the last position, not a snapshot of everything
    _assert_order_per_key(records, events)


def test_the_broker_away_and_back(cdc, binlog_db, cdc_broker):
    keys = [f"broker-{uuid.uuid4().hex[:8]}-{i}" for i in range(10)]
    cdc()
    with binlog_db.connect() as db:
        first = [outbox_insert(db, order_id=key) for key in keys]
        published(cdc_broker, keys, count=len(first))
        cdc_broker.stop()
        during = [outbox_insert(db, order_id=key) for key in keys]
        time.sleep(8)  # several failed publishes (OUTBOX_PUBLISH_TIMEOUT is 5 s in the tests)
        cdc_broker.start()  # empty: Tansu keeps its data in memory
        cdc_broker.create_topics(TOPIC, DLQ)
        after = [outbox_insert(db, order_id=key) for key in keys]
    records = published(cdc_broker, keys, count=len(during + after), timeout=120)
    assert {r.headers["id"] for r in records} >= set(during + after)
    _assert_order_per_key(records, first + during + after)


def test_the_database_restarted(cdc, binlog_db, cdc_broker):
    keys = [f"dbrestart-{uuid.uuid4().hex[:8]}-{i}" for i in range(10)]
    relay_cdc = cdc()
    with binlog_db.connect() as db:
        before = [outbox_insert(db, order_id=key) for key in keys]
    published(cdc_broker, keys, count=len(before))
    binlog_db.stop()
    time.sleep(2)
    binlog_db.start()
    with binlog_db.connect() as db:
        after = [outbox_insert(db, order_id=key) for key in keys]
    records = published(cdc_broker, keys, count=len(before + after), timeout=120)
    assert {r.headers["id"] for r in records} == set(before + after)
    assert relay_cdc.poll() is None


def test_a_row_the_broker_refuses_for_good_is_dead_lettered_and_its_order_goes_on(cdc, binlog_db, cdc_broker):
    key = f"large-{uuid.uuid4().hex[:8]}"
    cdc()
    with binlog_db.connect() as db:
        too_large = outbox_insert(db, order_id=key, payload={"order_id": key, "notes": "x" * 1_100_000})
        later = outbox_insert(db, order_id=key)
    published(cdc_broker, [key], count=1)
    dead = read_topic(cdc_broker.bootstrap, DLQ, keys={key}, timeout=30, until=lambda records: records)
    assert dead[0].headers["id"] == too_large
    assert "MSG_SIZE_TOO_LARGE" in dead[0].headers["dlq.error"]
    with binlog_db.connect() as db:
        cursor = db.cursor()
        cursor.execute("SELECT status FROM outbox_outboxevent WHERE event_id = %s", [uuid.UUID(too_large).hex])
        assert cursor.fetchone() == ("dead",)
        cursor.execute("SELECT status, error FROM outbox_failedevent WHERE event_id = %s", [uuid.UUID(too_large).hex])
        status, error = cursor.fetchone()
    assert status == "dead_lettered" and "MSG_SIZE_TOO_LARGE" in error
    assert [r.headers["id"] for r in published(cdc_broker, [key], count=1)] == [later]


def test_missing_connector_variables_stop_it_at_start_up_with_their_names():
    del_env = {k: v for k, v in os.environ.items() if not k.startswith("DEBEZIUM_")}
    relay_cdc = subprocess.run(
        [sys.executable, "manage.py", "relay_cdc"], cwd=PROJECT, capture_output=True, text=True, timeout=60,
        env={**del_env, "DJANGO_SETTINGS_MODULE": "tests.settings"})
    assert relay_cdc.returncode == 1
    assert "DEBEZIUM_DB_HOST" in relay_cdc.stderr and "DEBEZIUM_DB_PASSWORD" in relay_cdc.stderr


def test_properties_debezium_refuses_stop_it_at_start_up_with_debeziums_reason(cdc, tmp_path):
    connector = json.loads((PROJECT / "deploy" / "debezium" / "outbox-connector.json").read_text())
    bad = tmp_path / "connector.json"
    bad.write_text(json.dumps({**connector, "snapshot.mode": "sometimes"}))
    relay_cdc = cdc(OUTBOX_CDC_CONNECTOR_FILE=str(bad))
    assert relay_cdc.wait(120) == 1
    log = relay_cdc.log_path.read_text()
    assert "CommandError: the Debezium engine stopped: Connector configuration is not valid. " \
           "The 'snapshot.mode' value is invalid" in log


def _assert_order_per_key(records, written: list[str]) -> None:
    """Per order, the first time each event appears follows the order the rows were written in (written: the
    event ids in the order of their inserts)."""
    position = {event_id: n for n, event_id in enumerate(written)}
    firsts: dict[str, list[int]] = defaultdict(list)
    seen = set()
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        if record.headers["id"] in position and record.headers["id"] not in seen:
            seen.add(record.headers["id"])
            firsts[record.key].append(position[record.headers["id"]])
    assert firsts and all(len(numbers) > 1 for numbers in firsts.values())  # orders of several events were checked
    for key, numbers in firsts.items():
        assert numbers == sorted(numbers), key


def test_a_schema_history_the_broker_lost_is_rebuilt_and_it_goes_on_from_its_position(cdc, binlog_db, cdc_broker):
    keys = [f"history-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    relay_cdc = cdc()
    with binlog_db.connect() as db:
        before = [outbox_insert(db, order_id=key) for key in keys]
    published(cdc_broker, keys, count=len(before))
    time.sleep(1.5)  # its position recorded
    relay_cdc.send_signal(signal.SIGTERM)
    assert relay_cdc.wait(60) == 0
    # What a broker that keeps topics in memory does when it restarts (or an operator deleting the topic).
    delete_history(cdc_broker)
    with binlog_db.connect() as db:
        after = [outbox_insert(db, order_id=key) for key in keys]
    relay_cdc = cdc()
    records = published(cdc_broker, keys, count=len(before + after))
    ids = Counter(r.headers["id"] for r in records)
    assert set(ids) == set(before + after)
    assert all(ids[event_id] == 1 for event_id in before)  # from its position: no snapshot published them again
    assert relay_cdc.poll() is None
    assert "rebuilding the history from the table's current structure" in relay_cdc.log_path.read_text()
