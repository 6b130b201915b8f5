"""HTTP load: a steady rate with commit-to-topic latency, and closed-loop throughput with wrk."""

import http.client
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import datetime

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

ORDER = {"customer_id": "c-bench", "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}]}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class TopicWatcher(threading.Thread):
    """Reads the topic from its end and records, per event id, now - occurredAt (the commit-to-topic time: when
    a reader of the topic gets the message; occurredAt is stamped inside the transaction, just before its
    commit). The consumer is not involved: bench.consume measures commit-to-projection."""

    def __init__(self, bootstrap: str, topic: str, marker: bytes):
        super().__init__(daemon=True)
        self.marker = marker  # only events of this run's orders count
        self.latencies: dict[str, float] = {}
        self.stopping = False
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
        self.consumer.poll(0.5)

    def run(self) -> None:
        while not self.stopping:
            message = self.consumer.poll(0.05)
            if message is None or message.error() or self.marker not in message.value():
                continue
            received = time.time()
            headers = dict(message.headers() or [])
            occurred = datetime.fromisoformat(headers["occurredAt"].decode()).timestamp()
            self.latencies.setdefault(headers["id"].decode(), received - occurred)
        self.consumer.close()


def steady_rate(*, port: int, token: str, rate: int, seconds: float, bootstrap: str, topic: str) -> dict:
    """POST orders at a steady rate from several connections; return latency percentiles in ms."""
    customer_id = f"c-bench-{uuid.uuid4().hex[:12]}"
    watcher = TopicWatcher(bootstrap, topic, marker=customer_id.encode())
    watcher.start()
    total = int(rate * seconds)
    threads = 8
    errors = []
    start = time.monotonic() + 0.2

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({**ORDER, "customer_id": customer_id})
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        for n in range(index, total, threads):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            connection.request("POST", "/api/orders/", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 201:
                errors.append(response.status)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    sent_in = time.monotonic() - start
    deadline = time.monotonic() + 15
    while len(watcher.latencies) < total - len(errors) and time.monotonic() < deadline:
        time.sleep(0.1)
    watcher.stopping = True
    watcher.join()
    received = [v * 1000 for v in watcher.latencies.values()]
    # An event that never arrived counts, as an infinite latency: it is in the percentiles, not dropped from them.
    missing = total - len(errors) - len(received)
    latencies = received + [float("inf")] * max(missing, 0)
    return {
        "orders": total, "errors": len(errors), "achieved_rate": total / sent_in, "received": len(received),
        "missing": missing, "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99), "max_ms": max(latencies),
    }


def wrk_throughput(*, port: int, token: str, seconds: int = 10, connections: int = 16) -> float:
    """Closed-loop order creation throughput (requests/s) measured by wrk, which is not written in Python."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (make bench installs it with apt-get)")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\n'
        f"wrk.body = '{json.dumps(ORDER)}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Token {token}"\n'
        "function response(status, headers, body)\n"
        '  if status ~= 201 then io.stderr:write("status " .. status .. "\\n") end\n'
        "end\n"
    )
    script.close()
    output = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", script.name, f"http://127.0.0.1:{port}/api/orders/"],
        capture_output=True, text=True, check=True,
    )
    if "status" in output.stderr:
        raise RuntimeError(f"non-201 answers during the throughput run: {output.stderr[:200]}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output.stdout).group(1))
