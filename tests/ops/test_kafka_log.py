"""librdkafka's own lines go through Python logging (the configured format, the client's name), and an outage's
repeats are held back: one line per client, facility and broker per KAFKA_LOG_REPEAT_INTERVAL, with a count."""

import json
import logging
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from ops.kafka_log import LOGGER_NAME, RepeatFilter
from tests.kafka_tools import free_port
from tests.processes import suite_env


def librdkafka_record(text="[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect failed", client="rdkafka#producer-1"):
    return logging.LogRecord(LOGGER_NAME, logging.ERROR, __file__, 1, "%s [%s] %s", ("FAIL", client, text), None)


def test_repeats_are_held_back_then_one_line_carries_their_count(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    repeats = RepeatFilter(interval=60)
    assert repeats.filter(librdkafka_record())
    assert [repeats.filter(librdkafka_record()) for _ in range(5)] == [False] * 5
    assert repeats.filter(librdkafka_record(client="rdkafka#consumer-2"))  # another client: its own line
    assert repeats.filter(librdkafka_record(text="[thrd:other:9092/1]: other:9092/1: Connect failed"))  # another broker
    clock[0] += 61
    record = librdkafka_record()
    assert repeats.filter(record)
    assert record.getMessage().endswith("(5 more like it in the last 61 s)")
    assert record.kafka_client == "rdkafka#producer-1"
    assert repeats.filter(logging.LogRecord("x", logging.INFO, __file__, 1, "not from librdkafka", (), None))


@pytest.mark.django_db
def test_the_relays_producer_logs_an_unreachable_broker_through_python_logging_once(caplog):
    from relay import kafka

    with override_settings(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"), caplog.at_level(logging.INFO):
        producer = kafka.Producer(kafka.producer_config())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # librdkafka retries the connection every few hundred ms meanwhile
            producer.poll(0.1)
    lines = [r for r in caplog.records if r.name == LOGGER_NAME and "Connect to" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR and lines[0].kafka_client.startswith("rdkafka#producer")


def test_a_consumer_process_with_no_broker_prints_json_lines_not_raw_librdkafka_ones():
    env = suite_env(type("NoBroker", (), {"bootstrap": f"127.0.0.1:{free_port()}"})(), LOG_FORMAT="json")
    process = subprocess.Popen([sys.executable, "manage.py", "consume_events"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("%")], output[-3000:]  # no raw librdkafka line
    kafka_lines = [json.loads(line) for line in lines if line.startswith("{") and f'"{LOGGER_NAME}"' in line]
    assert kafka_lines, output[-3000:]
    assert {line["kafka_client"].split("-")[0] for line in kafka_lines} >= {"rdkafka#consumer"}
    # Its clients (the group member and the lag reader) each say it once, not once per reconnect.
    connect_lines = [line for line in kafka_lines if "Connect to" in line["message"]]
    assert len(connect_lines) <= 2 * 2, connect_lines  # two clients, bootstrap and at most one more thread each
