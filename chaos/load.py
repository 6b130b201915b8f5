"""HTTP load at a steady rate, keeping the exact truth of what was committed.

Every create carries its own Idempotency-Key. An answer that says nothing about the outcome (a connection
error, a timeout, a 5xx while the database restarts) makes the request "unknown": it is retried, the create
with the same key (the first answer is replayed if it had committed), the cancel as is (a 409 "already
cancelled" after an unknown attempt means that attempt committed). So the truth stays exact.
"""

import heapq
import http.client
import itertools
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

PRICES = ("9.99", "15.00", "0.50", "120.25", "3.10")


@dataclass
class OrderTruth:
    order_id: int
    customer_id: str
    total: Decimal
    index: int
    cancelled: bool = False  # the cancel committed (200, or 409 after an attempt of unknown outcome)


@dataclass(order=True)
class Job:
    due: float
    seq: int
    kind: str = field(compare=False)  # "create" | "cancel"
    index: int = field(compare=False)
    body: dict | None = field(compare=False, default=None)
    order_id: int | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)
    unknown: bool = field(compare=False, default=False)  # an earlier attempt's outcome is unknown
    first_try: float | None = field(compare=False, default=None)


class Load:
    def __init__(self, *, port: int, token: str, rate: float, run_id: str, customers: int = 12, threads: int = 8,
                 cancel_every: int = 4, seed: int = 0, give_up_after: float = 240.0, log=print):
        self.port = port
        self.token = token
        self.rate = rate
        self.run_id = run_id
        self.customer_ids = [f"chaos-{run_id}-c{i:02d}" for i in range(customers)]
        self.threads = threads
        self.cancel_every = cancel_every
        self.random = random.Random(seed)
        self.give_up_after = give_up_after
        self.log = log

        self.orders: dict[int, OrderTruth] = {}
        self.counts: Counter = Counter()
        self.unexpected: list[str] = []  # answers that must not happen (400, 404, 422, duplicate ids...)
        self.unresolved: list[str] = []  # requests whose outcome stayed unknown
        self.unknown_by_kind: Counter = Counter()

        self._heap: list[Job] = []
        self._seq = itertools.count()
        self._index = itertools.count()
        self._cond = threading.Condition()
        self._busy = 0
        self._creating = False
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._scheduler: threading.Thread | None = None
        self.created_jobs = 0

    # ------------------------------------------------------------------------------------------ control

    def start_workers(self) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._worker, name=f"load-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def start_creating(self) -> None:
        self._creating = True
        self._scheduler = threading.Thread(target=self._schedule, name="load-scheduler", daemon=True)
        self._scheduler.start()

    def stop_creating(self) -> None:
        self._creating = False
        if self._scheduler is not None:
            self._scheduler.join()

    def create_one(self) -> None:
        """Queue one create now (the warm-up order)."""
        self._push(self._create_job(time.monotonic()))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued request (creates, cancels, retries) has a known outcome."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self._creating = False
        with self._cond:
            self._closing = True
            for job in self._heap:
                self.unresolved.append(f"{job.kind} #{job.index} (order {job.order_id}) still queued at the end")
            self._heap.clear()
            self._cond.notify_all()
        for thread in self._workers:
            thread.join(20)

    # ------------------------------------------------------------------------------------------ jobs

    def _create_job(self, due: float) -> Job:
        index = next(self._index)
        items = [
            {"sku": f"SKU-{self.random.randint(1, 40)}", "quantity": self.random.randint(1, 3),
             "unit_price": self.random.choice(PRICES)}
            for _ in range(self.random.randint(1, 3))
        ]
        body = {"customer_id": self.customer_ids[index % len(self.customer_ids)], "items": items}
        self.created_jobs += 1
        return Job(due=due, seq=next(self._seq), kind="create", index=index, body=body)

    def _push(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                return
            heapq.heappush(self._heap, job)
            self._cond.notify()

    def _schedule(self) -> None:
        start = time.monotonic()
        n = 0
        while self._creating:
            due = start + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.2))
                continue
            self._push(self._create_job(due))
            n += 1

    def _worker(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        connection.close()
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0].due <= now:
                        job = heapq.heappop(self._heap)
                        self._busy += 1
                        break
                    self._cond.wait(min(self._heap[0].due - now, 0.5) if self._heap else 0.5)
            try:
                connection = self._run(job, connection)
            except Exception as exc:  # a bug in the load generator itself must not hang the run
                self.unexpected.append(f"load generator error on {job.kind} #{job.index}: {exc!r}")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _request(self, connection, method: str, path: str, body: dict | None, headers: dict):
        """Returns (status or None for 'no answer', parsed body, connection to use next)."""
        headers = {"Authorization": f"Token {self.token}", **headers}
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            return None, repr(exc), http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw[:200]
        return response.status, parsed, connection

    def _retry(self, job: Job, why: str) -> None:
        now = time.monotonic()
        if now - job.first_try > self.give_up_after:
            self.unresolved.append(f"{job.kind} #{job.index} (order {job.order_id}): still {why} "
                                   f"after {job.attempts} attempts")
            return
        job.due = now + min(0.25 * 2 ** min(job.attempts - 1, 4), 3.0)
        job.seq = next(self._seq)
        self._push(job)

    def _run(self, job: Job, connection):
        job.attempts += 1
        if job.first_try is None:
            job.first_try = time.monotonic()
        if job.kind == "create":
            status, body, connection = self._request(
                connection, "POST", "/api/orders/", job.body,
                {"Idempotency-Key": f"chaos-{self.run_id}-{job.index}"},
            )
            self.counts[f"create {status or 'no answer'}"] += 1
            if status == 201:
                self._committed_create(job, body)
            elif status is None or status >= 500:
                job.unknown = True
                self.unknown_by_kind["create"] += 1
                self._retry(job, "unknown")
            elif status == 409:  # the same key still in flight (an earlier attempt is running or died mid-way)
                self._retry(job, "in flight (409)")
            else:
                self.unexpected.append(f"create #{job.index}: {status} {body}")
        else:
            status, body, connection = self._request(connection, "POST", f"/api/orders/{job.order_id}/cancel/",
                                                     None, {})
            self.counts[f"cancel {status or 'no answer'}"] += 1
            if status == 200:
                self.orders[job.order_id].cancelled = True
            elif status == 409 and job.unknown:
                self.orders[job.order_id].cancelled = True  # the attempt whose answer was lost had committed
                self.counts["cancel resolved by 409 after unknown"] += 1
            elif status is None or status >= 500:
                job.unknown = True
                self.unknown_by_kind["cancel"] += 1
                self._retry(job, "unknown")
            else:
                self.unexpected.append(f"cancel of order {job.order_id}: {status} {body}")
        return connection

    def _committed_create(self, job: Job, body: dict) -> None:
        order_id = int(body["id"])
        if job.unknown:
            self.counts["create resolved by retry with the same key"] += 1
        if order_id in self.orders:
            self.unexpected.append(f"create #{job.index}: order id {order_id} answered twice")
            return
        if body.get("customer_id") != job.body["customer_id"] or body.get("status") != "created":
            self.unexpected.append(f"create #{job.index}: unexpected body {body}")
        self.orders[order_id] = OrderTruth(order_id=order_id, customer_id=body["customer_id"],
                                           total=Decimal(body["total"]), index=job.index)
        if job.index % self.cancel_every == 0:  # a quarter of the orders are cancelled shortly after
            self._push(Job(due=time.monotonic() + self.random.uniform(0.2, 1.5), seq=next(self._seq),
                           kind="cancel", index=job.index, order_id=order_id))

    # ------------------------------------------------------------------------------------------ truth

    def truth_by_customer(self) -> dict[str, dict]:
        truth = {c: {"orders_created": 0, "orders_cancelled": 0, "total_spent": Decimal("0.00")}
                 for c in self.customer_ids}
        for order in self.orders.values():
            row = truth[order.customer_id]
            row["orders_created"] += 1
            if order.cancelled:
                row["orders_cancelled"] += 1
            else:
                row["total_spent"] += order.total
        return truth
