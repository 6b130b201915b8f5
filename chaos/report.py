"""What the run proves: the committed truth against what the checker saw, the consumer applied and the database holds."""

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import dj_database_url
import MySQLdb

CREATED, CANCELLED = "OrderCreated", "OrderCancelled"


class Database:
    """Plain MySQLdb reads with a fresh connection each time: the run restarts the server under us."""

    def __init__(self, url: str):
        config = dj_database_url.parse(url)
        self.params = dict(host=config["HOST"] or "127.0.0.1", port=int(config["PORT"] or 3306),
                           user=config["USER"], password=config["PASSWORD"] or "", database=config["NAME"],
                           connect_timeout=5, charset="utf8mb4")

    def query(self, sql: str, params=()) -> list[tuple]:
        connection = MySQLdb.connect(**self.params)
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            return list(cursor.fetchall())
        finally:
            connection.close()

    def pending(self) -> int:
        return self.query("SELECT COUNT(*) FROM outbox_outboxevent WHERE status = 'pending'")[0][0]

    def processed(self, group_id: str) -> dict[str, tuple[int, str]]:
        """event id -> (row id, i.e. the order the consumer applied them in; event type)."""
        rows = self.query("SELECT id, event_id, event_type FROM inbox_processedevent WHERE group_id = %s", [group_id])
        return {_uuid(r[1]): (r[0], r[2]) for r in rows}

    def projection(self, customer_ids: list[str]) -> dict[str, dict]:
        if not customer_ids:
            return {}
        placeholders = ",".join(["%s"] * len(customer_ids))
        rows = self.query(
            f"SELECT customer_id, orders_created, orders_cancelled, total_spent FROM stats_customerstats "
            f"WHERE customer_id IN ({placeholders})", customer_ids)
        return {r[0]: {"orders_created": r[1], "orders_cancelled": r[2], "total_spent": Decimal(r[3])} for r in rows}


def _uuid(value) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def projection_mismatches(truth: dict[str, dict], projection: dict[str, dict]) -> dict[str, tuple]:
    """customer id -> (expected, actual) for every customer whose projection differs from the truth."""
    zero = {"orders_created": 0, "orders_cancelled": 0, "total_spent": Decimal("0.00")}
    out = {}
    for customer_id, expected in truth.items():
        actual = projection.get(customer_id, zero)
        if expected == zero and customer_id not in projection:
            continue
        if actual != expected:
            out[customer_id] = (expected, actual)
    for customer_id in set(projection) - set(truth):
        out[customer_id] = (None, projection[customer_id])
    return out


def expected_events(orders) -> set[tuple[str, str]]:
    expected = set()
    for order in orders.values():
        expected.add((str(order.order_id), CREATED))
        if order.cancelled:
            expected.add((str(order.order_id), CANCELLED))
    return expected


@dataclass
class Figure:
    name: str
    value: object
    must_be_zero: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.must_be_zero or self.value == 0


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    comparison: dict[str, int] = field(default_factory=dict)  # the figures `--compare` puts side by side

    def add(self, name, value, *, must_be_zero=False, note=""):
        self.figures.append(Figure(name, value, must_be_zero, note))

    @property
    def passed(self) -> bool:
        return all(f.ok for f in self.figures)

    def figure(self, name: str):
        """A figure's value; "n/a" for one this run does not count (the baseline's outbox figures)."""
        return next((f.value for f in self.figures if f.name == name), "n/a")

    def table(self) -> str:
        width = max(len(f.name) for f in self.figures)
        vwidth = max(len(str(f.value)) for f in self.figures)
        lines = [f"{'figure'.ljust(width)}  {'value'.rjust(vwidth)}  check", "-" * (width + vwidth + 14)]
        for f in self.figures:
            check = ("ok" if f.ok else "FAIL (must be 0)") if f.must_be_zero else "info"
            note = f"   {f.note}" if f.note else ""
            lines.append(f"{f.name.ljust(width)}  {str(f.value).rjust(vwidth)}  {check}{note}")
        return "\n".join(lines)


def build_report(*, load, records, db: Database, group_id: str, outbox: bool = True, marks_sent: bool = True,
                 max_detail: int = 15) -> Report:
    """outbox=False for the direct-publish baseline: it writes no outbox rows, so the figures read off the outbox
    table (and the consumer's, which are keyed by its event ids) do not apply; the others are counted alike."""
    report = Report()
    orders = load.orders
    expected = expected_events(orders)
    cancelled = sum(1 for o in orders.values() if o.cancelled)

    # ---- what the checker saw in Kafka
    by_event: dict[str, list] = defaultdict(list)
    first_seen: dict[tuple[str, str], int] = {}
    ids_by_key_type: dict[tuple[str, str], set] = defaultdict(set)
    for seen in records:
        by_event[seen.event_id].append(seen)
        key_type = (seen.key, seen.event_type)
        ids_by_key_type[key_type].add(seen.event_id)
        if key_type not in first_seen:
            first_seen[key_type] = seen.seq
    missing = sorted(expected - set(first_seen), key=lambda kt: (int(kt[0]), kt[1]))
    lost_orders = sorted({int(k) for k, _ in missing})
    duplicated = {e: s for e, s in by_event.items() if len(s) > 1}
    extra_copies = sum(len(s) - 1 for s in duplicated.values())
    violations = sorted({  # orders, each once (expected holds two events of a cancelled order)
        key for key, _ in expected if (key, CANCELLED) in first_seen and (key, CREATED) in first_seen
        and first_seen[(key, CANCELLED)] < first_seen[(key, CREATED)]
    }, key=int)
    unexpected_events = sorted(set(first_seen) - expected, key=str)
    conflicting = sorted(kt for kt, ids in ids_by_key_type.items() if len(ids) > 1)
    epochs = Counter(s.epoch for s in records)

    # ---- the database: outbox, consumer, projection, orders table
    outbox_rows = db.query("SELECT event_id, aggregate_id, event_type, status, attempts FROM outbox_outboxevent")
    if not outbox and outbox_rows:
        raise ValueError("the direct-publish baseline wrote outbox rows")
    status_counts = Counter(r[3] for r in outbox_rows)
    max_attempts = max((r[4] for r in outbox_rows), default=0)
    retried_rows = sum(1 for r in outbox_rows if r[4] > 1)
    outbox_by_id = {_uuid(r[0]): (r[1], r[2]) for r in outbox_rows}
    outbox_key_types = {(r[1], r[2]) for r in outbox_rows}
    failed_events = db.query("SELECT COUNT(*) FROM outbox_failedevent")[0][0]
    consumer_dead = db.query("SELECT COUNT(*) FROM inbox_consumerdeadletter WHERE group_id = %s", [group_id])[0][0]
    processed = db.processed(group_id)
    committed_event_ids = {e for e, kt in outbox_by_id.items() if kt in expected}
    not_applied = sorted(committed_event_ids - set(processed), key=lambda e: int(outbox_by_id[e][0]))
    applied_row = {outbox_by_id[e]: row for e, (row, _) in processed.items() if e in outbox_by_id}
    consumer_violations = [
        key for key, t in expected if t == CANCELLED and (key, CREATED) in applied_row
        and (key, CANCELLED) in applied_row and applied_row[(key, CANCELLED)] < applied_row[(key, CREATED)]
    ]
    projection = db.projection(load.customer_ids)
    mismatches = projection_mismatches(load.truth_by_customer(), projection)
    table_orders = {r[0]: (r[1], r[2], Decimal(r[3])) for r in
                    db.query("SELECT id, customer_id, status, total FROM orders_order")}
    truth_vs_table = sorted(
        set(table_orders) ^ set(orders)
        | {i for i, o in orders.items() if i in table_orders and table_orders[i] != (
            o.customer_id, "cancelled" if o.cancelled else "created", o.total)}
    )
    truth_vs_outbox = len(expected ^ outbox_key_types)

    total_seen = len(records)
    report.add("orders committed (201 answers)", len(orders))
    report.add("cancels committed (200 answers)", cancelled)
    report.add("events committed (expected in Kafka)", len(expected))
    report.add("answers of unknown outcome (5xx, none), retried",
               sum(load.unknown_by_kind.values()),
               note=", ".join(f"{k} {v}" for k, v in sorted(load.unknown_by_kind.items())))
    report.add("requests still unresolved", len(load.unresolved), must_be_zero=True, note="the truth would be inexact")
    report.add("unexpected HTTP answers", len(load.unexpected), must_be_zero=True)
    report.add("truth vs orders table differences", len(truth_vs_table), must_be_zero=True)
    if outbox:
        report.add("truth vs outbox table differences", truth_vs_outbox, must_be_zero=True)
    report.add("messages read by the checker", total_seen,
               note="per broker life: " + ", ".join(f"#{e}: {n}" for e, n in sorted(epochs.items())))
    report.add("LOST: orders with events missing in Kafka", len(lost_orders), must_be_zero=True,
               note=f"{len(missing)} event(s)")
    report.add("events seen more than once", len(duplicated),
               note=f"{extra_copies} extra cop(y/ies), {100 * extra_copies / max(total_seen, 1):.1f}% of messages "
                    f"(allowed: at-least-once)")
    report.add("per-order order violations in Kafka", len(violations), must_be_zero=True)
    report.add("events for no committed change", len(unexpected_events), must_be_zero=True)
    report.add("orders with two ids for one event", len(conflicting), must_be_zero=True)
    if outbox:
        report.add("committed events not applied by the consumer", len(not_applied), must_be_zero=True)
        report.add("per-order order violations in the consumer", len(consumer_violations), must_be_zero=True)
    report.add("consumer dead letters", consumer_dead, must_be_zero=True)
    report.add("projection rows differing from the truth", len(mismatches), must_be_zero=True,
               note=f"{len(projection)} customer rows")
    if outbox:
        if marks_sent:  # relay_cdc publishes from the binlog and leaves every row pending
            report.add("outbox rows left pending", status_counts.get("pending", 0), must_be_zero=True)
        report.add("outbox rows dead-lettered", status_counts.get("dead", 0), must_be_zero=True,
                   note="an outage must not dead-letter")
        report.add("failed events recorded", failed_events, must_be_zero=True)
        report.add("outbox rows published after retries", retried_rows, note=f"max attempts of one row: {max_attempts}")
    report.comparison = {
        "orders committed": len(orders), "events committed": len(expected), "events lost": len(missing),
        "orders with an event lost": len(lost_orders), "events seen more than once": len(duplicated),
        "per-order order violations": len(violations), "projection rows differing from the truth": len(mismatches),
    }

    def detail(title, items, render=str):
        if items:
            report.details.append(f"{title} ({len(items)}): " + "; ".join(render(i) for i in list(items)[:max_detail])
                                  + (" ..." if len(items) > max_detail else ""))

    detail("missing events (order id, type)", missing)
    detail("order violations (order id)", violations)
    detail("events for no committed change (key, type)", unexpected_events)
    detail("two ids for one event (key, type)", conflicting)
    detail("not applied by the consumer (order id, type, event id)", not_applied,
           lambda e: f"{outbox_by_id[e][0]} {outbox_by_id[e][1]} {e}")
    detail("consumer order violations (order id)", consumer_violations)
    detail("projection mismatches (customer: expected / actual)", list(mismatches.items()),
           lambda kv: f"{kv[0]}: {kv[1][0]} / {kv[1][1]}")
    detail("truth vs orders table (order id)", truth_vs_table)
    detail("unresolved requests", load.unresolved)
    detail("unexpected HTTP answers", load.unexpected)
    return report
