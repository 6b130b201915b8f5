"""A Kafka cluster that misbehaves like a real one, on demand: librdkafka's mock cluster, in a process of its own.

Real Apache Kafka cannot run on the machines this project is built on, and the dev broker (Tansu) is one node
that never moves a leader, never runs short of replicas and never fences a producer. librdkafka ships a mock
cluster with a fault-injection API (rdkafka_mock.h), exported by the librdkafka inside the confluent-kafka
wheel. This module drives it with ctypes:

    python -m chaos.mock_cluster --brokers 3 --topic outbox.event.order:6 --topic outbox.dlq:1 ...

prints one JSON line ({"bootstrap": "127.0.0.1:port,..."}), then reads one JSON command per line on stdin and
answers one JSON line on stdout ({"ok": true} or {"error": "..."}); it exits when stdin closes. The commands:

    {"op": "set_leader", "topic": t, "partition": p, "broker": b}   # b -1: leaderless
    {"op": "move_leaders", "topic": t}                   # every partition's leader to the next broker
    {"op": "broker_down", "broker": b} / {"op": "broker_up", "broker": b}     # b -1: every broker
    {"op": "set_rtt", "broker": b, "ms": n}
    {"op": "push_errors", "api": "Produce", "errors": ["NOT_ENOUGH_REPLICAS", ...]}   # the next requests
    {"op": "push_broker_errors", "broker": b, "api": "Produce", "errors": [[name, rtt_ms], ...]}
    {"op": "clear_errors", "api": "Produce"}
    {"op": "set_coordinator", "group": g, "broker": b}
    {"op": "create_topic", "topic": t, "partitions": n}

MockCluster is the client the tests and the chaos run use. Broker ids are 1..brokers. What the mock does not
do (documented by librdkafka): elect leaders by itself (a broker that goes down keeps its partitions
leaderless until set_leader or move_leaders), CreateTopics and the other admin requests (topics are created
here, or auto-created on a metadata request, with 4 partitions).
"""

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from confluent_kafka import KafkaError

# Kafka protocol API keys.
API_KEYS = {"Produce": 0, "Fetch": 1, "ListOffsets": 2, "Metadata": 3, "OffsetCommit": 8, "OffsetFetch": 9,
            "FindCoordinator": 10, "JoinGroup": 11, "Heartbeat": 12, "LeaveGroup": 13, "SyncGroup": 14,
            "InitProducerId": 22}


# Today's protocol names that the client still spells the old way.
ALIASES = {"NOT_LEADER_OR_FOLLOWER": "NOT_LEADER_FOR_PARTITION"}


def error_code(name: str) -> int:
    """A Kafka protocol error by its name (KafkaError's constants: NOT_ENOUGH_REPLICAS, REQUEST_TIMED_OUT...)."""
    code = getattr(KafkaError, ALIASES.get(name, name), None)
    if not isinstance(code, int) or code < 0:
        raise ValueError(f"not a broker error code: {name}")
    return code


def _librdkafka() -> ctypes.CDLL:
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    candidates = sorted(glob.glob(str(libs / "librdkafka*.so*")))
    if not candidates:
        raise RuntimeError(f"no librdkafka in {libs}")
    lib = ctypes.CDLL(candidates[0])
    vp, cp, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32
    signatures = {
        "rd_kafka_conf_new": (vp, []),
        "rd_kafka_conf_set": (ctypes.c_int, [vp, cp, cp, cp, ctypes.c_size_t]),
        "rd_kafka_new": (vp, [ctypes.c_int, vp, cp, ctypes.c_size_t]),
        "rd_kafka_mock_cluster_new": (vp, [vp, ctypes.c_int]),
        "rd_kafka_mock_cluster_bootstraps": (cp, [vp]),
        "rd_kafka_mock_topic_create": (ctypes.c_int, [vp, cp, ctypes.c_int, ctypes.c_int]),
        "rd_kafka_mock_partition_set_leader": (ctypes.c_int, [vp, cp, i32, i32]),
        "rd_kafka_mock_broker_set_down": (ctypes.c_int, [vp, i32]),
        "rd_kafka_mock_broker_set_up": (ctypes.c_int, [vp, i32]),
        "rd_kafka_mock_broker_set_rtt": (ctypes.c_int, [vp, i32, ctypes.c_int]),
        "rd_kafka_mock_push_request_errors_array": (None, [vp, ctypes.c_int16, ctypes.c_size_t,
                                                           ctypes.POINTER(ctypes.c_int)]),
        "rd_kafka_mock_clear_request_errors": (None, [vp, ctypes.c_int16]),
        "rd_kafka_mock_coordinator_set": (ctypes.c_int, [vp, cp, cp, i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    # Variadic: (error, rtt_ms) pairs; ctypes passes them as given.
    lib.rd_kafka_mock_broker_push_request_error_rtts.restype = ctypes.c_int
    return lib


class _Server:
    def __init__(self, brokers: int, topics: list[tuple[str, int]]):
        self.lib = _librdkafka()
        self.brokers = brokers
        errstr = ctypes.create_string_buffer(512)
        conf = self.lib.rd_kafka_conf_new()
        self.lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, 512)
        self.handle = self.lib.rd_kafka_new(0, conf, errstr, 512)  # a producer handle that only hosts the cluster
        if not self.handle:
            raise RuntimeError(errstr.value.decode())
        self.cluster = self.lib.rd_kafka_mock_cluster_new(self.handle, brokers)
        if not self.cluster:
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self.partitions: dict[str, int] = {}
        self.leaders: dict[tuple[str, int], int] = {}
        for topic, partitions in topics:
            self.create_topic(topic=topic, partitions=partitions)

    def bootstrap(self) -> str:
        return self.lib.rd_kafka_mock_cluster_bootstraps(self.cluster).decode()

    def _check(self, code: int, what: str) -> None:
        if code:
            raise RuntimeError(f"{what}: error {code}")

    def create_topic(self, *, topic: str, partitions: int) -> None:
        self._check(self.lib.rd_kafka_mock_topic_create(self.cluster, topic.encode(), partitions,
                                                        min(3, self.brokers)), "topic_create")
        self.partitions[topic] = partitions
        for partition in range(partitions):  # spread over the brokers, known here so that moves are too
            self.set_leader(topic=topic, partition=partition, broker=partition % self.brokers + 1)

    def set_leader(self, *, topic: str, partition: int, broker: int) -> None:
        self._check(self.lib.rd_kafka_mock_partition_set_leader(self.cluster, topic.encode(), partition, broker),
                    "partition_set_leader")
        self.leaders[(topic, partition)] = broker

    def move_leaders(self, *, topic: str, avoid: list[int] = ()) -> None:
        for partition in range(self.partitions[topic]):
            broker = self.leaders[(topic, partition)]
            for _ in range(self.brokers):
                broker = broker % self.brokers + 1
                if broker not in avoid:
                    break
            self.set_leader(topic=topic, partition=partition, broker=broker)

    def broker_down(self, *, broker: int) -> None:
        self._check(self.lib.rd_kafka_mock_broker_set_down(self.cluster, broker), "broker_set_down")

    def broker_up(self, *, broker: int) -> None:
        self._check(self.lib.rd_kafka_mock_broker_set_up(self.cluster, broker), "broker_set_up")

    def set_rtt(self, *, broker: int, ms: int) -> None:
        self._check(self.lib.rd_kafka_mock_broker_set_rtt(self.cluster, broker, ms), "broker_set_rtt")

    def push_errors(self, *, api: str, errors: list[str]) -> None:
        codes = (ctypes.c_int * len(errors))(*[error_code(e) for e in errors])
        self.lib.rd_kafka_mock_push_request_errors_array(self.cluster, API_KEYS[api], len(errors), codes)

    def push_broker_errors(self, *, broker: int, api: str, errors: list[list]) -> None:
        pairs = [v for name, rtt in errors for v in (ctypes.c_int(error_code(name)), ctypes.c_int(int(rtt)))]
        self._check(self.lib.rd_kafka_mock_broker_push_request_error_rtts(
            ctypes.c_void_p(self.cluster), ctypes.c_int32(broker), ctypes.c_int16(API_KEYS[api]),
            ctypes.c_size_t(len(errors)), *pairs), "broker_push_request_error_rtts")

    def clear_errors(self, *, api: str) -> None:
        self.lib.rd_kafka_mock_clear_request_errors(self.cluster, API_KEYS[api])

    def set_coordinator(self, *, group: str, broker: int) -> None:
        self._check(self.lib.rd_kafka_mock_coordinator_set(self.cluster, b"group", group.encode(), broker),
                    "coordinator_set")

    def serve(self) -> None:
        print(json.dumps({"bootstrap": self.bootstrap(), "brokers": self.brokers}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                op = command.pop("op")
                if op.startswith("_") or op in ("serve", "bootstrap"):
                    raise ValueError(f"unknown op {op}")
                getattr(self, op)(**command)
                print(json.dumps({"ok": True}), flush=True)
            except Exception as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


class MockCluster:
    """The client side: starts `python -m chaos.mock_cluster` and sends it commands."""

    def __init__(self, *, brokers: int = 3, topics: dict[str, int], log_path: Path | None = None):
        self.brokers = brokers
        self.topics = dict(topics)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.bootstrap = ""
        self._lock = threading.Lock()

    def start(self) -> "MockCluster":
        argv = [sys.executable, "-m", "chaos.mock_cluster", "--brokers", str(self.brokers)]
        for topic, partitions in self.topics.items():
            argv += ["--topic", f"{topic}:{partitions}"]
        root = Path(__file__).resolve().parent.parent
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                        start_new_session=True)
        first = self.process.stdout.readline()
        if not first:
            raise RuntimeError(f"the mock cluster did not start (exit {self.process.wait()})")
        self.bootstrap = json.loads(first)["bootstrap"]
        return self

    def call(self, op: str, **args) -> None:
        with self._lock:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
            answer = json.loads(self.process.stdout.readline() or '{"error": "the mock cluster exited"}')
        if "error" in answer:
            raise RuntimeError(f"mock cluster {op}: {answer['error']}")

    def move_leaders(self, topic: str | None = None, avoid: list[int] = ()) -> None:
        for name in [topic] if topic else self.topics:
            self.call("move_leaders", topic=name, avoid=list(avoid))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos.mock_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--topic", action="append", default=[], help="name:partitions, repeatable")
    args = parser.parse_args(argv)
    topics = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.topic]
    _Server(args.brokers, topics).serve()


if __name__ == "__main__":
    main()
