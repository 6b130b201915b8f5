"""The deployment files agree with the code: the Debezium connector, docker-compose.yml and the Dockerfile.

File checks only: no database, no broker.
"""

import json
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from django.conf import settings

from outbox.models import OutboxEvent
from relay.claim import Claimed

ROOT = Path(__file__).resolve().parent.parent
CONNECTOR = ROOT / "deploy" / "debezium" / "outbox-connector.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROCFILE = ROOT / "Procfile"
SETTINGS_SOURCE = ROOT / "project" / "settings.py"

DATABASE = "orders"
TABLE = OutboxEvent._meta.db_table
COLUMNS = {f.column for f in OutboxEvent._meta.fields}
SMT = "transforms.outbox."

# The process commands every deployment runs (DESIGN.md "Commands").
PROCESSES = {
    "web": ["gunicorn", "project.wsgi"],
    "worker": ["celery", "-A", "project", "worker"],
    "beat": ["celery", "-A", "project", "beat"],
    "consumer": ["python", "manage.py", "consume_events"],
}
APP_SERVICES = {*PROCESSES, "migrate"}
# Naive UTC, as the relay's raw cursor returns it.
OCCURRED_AT = datetime(2025, 1, 2, 3, 4, 5, 678901)


@pytest.fixture(autouse=True)
def kafka_settings():
    """Overrides the suite's autouse fixture of that name: these tests need no broker."""
    yield


@pytest.fixture(scope="module")
def connector() -> dict[str, str]:
    return json.loads(CONNECTOR.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _sample_claimed() -> Claimed:
    """A relay row whose every field has a distinct value, so a header's value names its column."""
    return Claimed(
        id=1, event_id="11111111-2222-3333-4444-555555555555", aggregate_type="order", aggregate_id="42",
        event_type="OrderCreated", payload='{"order_id": "42"}',
        occurred_at=OCCURRED_AT, attempts=0,
        trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", trace_state="congo=t61rcWkgMzE",
    )


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Headers whose value is the same for every event: not a column. ce_source is the setting of that name.
CONSTANT_HEADERS = {"ce_specversion": "1.0", "content-type": "application/json",
                    "ce_source": "${env:OUTBOX_CLOUDEVENTS_SOURCE}"}


def _relay_header_columns() -> dict[str, str]:
    """Header name -> outbox column, as the Celery relay sends them (Claimed's fields are the column names)."""
    row = _sample_claimed()
    by_value = {
        row.event_id: "event_id", row.aggregate_type: "aggregate_type", row.aggregate_id: "aggregate_id",
        row.event_type: "event_type", row.trace_parent: "trace_parent", row.trace_state: "trace_state",
    }
    columns = {}
    for name, value in row.headers().items():
        if name in CONSTANT_HEADERS:
            continue
        if value in by_value:
            columns[name] = by_value[value]
        else:
            # The only other header is the occurrence time, as ISO 8601.
            assert _as_utc(datetime.fromisoformat(value)) == _as_utc(OCCURRED_AT), (name, value)
            columns[name] = "occurred_at"
    return columns


def _relay_constant_headers() -> dict[str, str]:
    headers = _sample_claimed().headers()
    assert headers["ce_source"] == settings.OUTBOX_CLOUDEVENTS_SOURCE
    return {name: value for name, value in headers.items() if name in CONSTANT_HEADERS}


def _cdc_header_columns(connector: dict[str, str]) -> dict[str, str]:
    """Header name -> outbox column, as the outbox EventRouter emits them."""
    # The router always adds the event id as header "id", from table.field.event.id (default column "id").
    headers = {"id": connector.get(SMT + "table.field.event.id", "id")}
    for spec in _split(connector.get(SMT + "table.fields.additional.placement", "")):
        column, placement, *alias = spec.split(":")
        if placement == "header":
            name = alias[0] if alias else column
            assert name not in headers, f"header {name!r} would be sent twice"
            headers[name] = column
    return headers


def _cdc_constant_headers(connector: dict[str, str]) -> dict[str, str]:
    """Header name -> value, as the InsertHeader transforms after the router add them."""
    transforms = _split(connector["transforms"])
    assert transforms[0] == "outbox"
    headers = {}
    for name in transforms[1:]:
        prefix = f"transforms.{name}."
        assert connector[prefix + "type"] == "org.apache.kafka.connect.transforms.InsertHeader"
        headers[connector[prefix + "header"]] = connector[prefix + "value.literal"]
    return headers


# --- the Debezium connector ---------------------------------------------------------------------------


def test_connector_captures_only_the_real_outbox_table(connector):
    assert connector["connector.class"] == "io.debezium.connector.mysql.MySqlConnector"
    assert connector["tasks.max"] == "1"
    assert connector["database.include.list"] == DATABASE
    assert connector["table.include.list"] == f"{DATABASE}.{TABLE}"
    assert connector["include.schema.changes"] == "false"


def test_every_column_the_connector_names_exists_on_the_model(connector):
    named = {
        connector[SMT + key]
        for key in ("table.field.event.id", "table.field.event.key", "table.field.event.type",
                    "table.field.event.payload", "route.by.field")
    }
    named |= {spec.split(":")[0] for spec in _split(connector[SMT + "table.fields.additional.placement"])}
    prefix = f"{DATABASE}.{TABLE}."
    for qualified in _split(connector["column.include.list"]):
        assert qualified.startswith(prefix), qualified
        named.add(qualified.removeprefix(prefix))
    assert named <= COLUMNS, f"not columns of {TABLE}: {sorted(named - COLUMNS)}"
    # Every column a message is built from is captured.
    assert named == {c.removeprefix(prefix) for c in _split(connector["column.include.list"])}


def test_snapshot_reads_only_pending_rows_of_the_real_table(connector):
    qualified = f"{DATABASE}.{TABLE}"
    assert connector["snapshot.mode"] == "initial"
    assert _split(connector["snapshot.select.statement.overrides"]) == [qualified]
    sql = connector[f"snapshot.select.statement.overrides.{qualified}"]
    match = re.fullmatch(r"SELECT \* FROM (\S+) WHERE (\w+) = '(\w+)' ORDER BY (\w+)", sql)
    assert match, sql
    table, column, value, order_by = match.groups()
    assert table == qualified
    assert column == "status" and column in COLUMNS
    assert value == OutboxEvent.Status.PENDING
    assert order_by == OutboxEvent._meta.pk.column


def test_topic_key_and_value_match_the_relay(connector):
    row = _sample_claimed()
    assert connector[SMT + "type"] == "io.debezium.transforms.outbox.EventRouter"
    # Topic: the relay routes by aggregate_type with OUTBOX_TOPIC_PREFIX.
    assert connector[SMT + "route.by.field"] == "aggregate_type"
    assert connector.get(SMT + "route.topic.regex", "(?<routedByValue>.*)") == "(?<routedByValue>.*)"
    replacement = connector[SMT + "route.topic.replacement"]
    assert replacement.replace("${routedByValue}", "order") == settings.OUTBOX_TOPIC_PREFIX + "order"
    assert replacement.replace("${routedByValue}", row.aggregate_type) == row.topic
    # Key: the aggregate id as a plain UTF-8 string.
    assert connector[SMT + "table.field.event.key"] == "aggregate_id"
    assert connector["key.converter"] == "org.apache.kafka.connect.storage.StringConverter"
    # Value: the payload's JSON text as stored, the relay's bytes: not parsed and serialized again, not wrapped
    # in a schema envelope, not double-encoded as a JSON string.
    assert connector[SMT + "table.field.event.payload"] == "payload"
    assert connector[SMT + "table.expand.json.payload"] == "false"
    assert connector["value.converter"] == "org.apache.kafka.connect.storage.StringConverter"
    # Headers as plain strings.
    assert connector["header.converter"] == "org.apache.kafka.connect.storage.SimpleHeaderConverter"


def test_headers_are_the_ones_the_relay_sends(connector):
    relay = _relay_header_columns()
    assert set(relay) == {"id", "eventType", "aggregateType", "aggregateId", "occurredAt",
                          "ce_id", "ce_type", "ce_time", "ce_subject", "traceparent", "tracestate"}
    assert _cdc_header_columns(connector) == relay
    relay_constants = _relay_constant_headers()
    assert {**relay_constants, "ce_source": CONSTANT_HEADERS["ce_source"]} == _cdc_constant_headers(connector)
    # Timestamps as ISO 8601 text, not epoch microseconds (Debezium's default for DATETIME(6)).
    assert connector["time.precision.mode"] == "connect"


def test_only_inserts_are_routed(connector):
    assert connector[SMT + "route.tombstone.on.empty.payload"] == "false"
    assert connector[SMT + "table.op.invalid.behavior"] in {"warn", "error"}
    assert set(_split(connector["skipped.operations"])) >= {"d", "t"}
    assert "u" not in _split(connector["skipped.operations"]), "updates must reach the router, which logs them"
    assert connector["tombstones.on.delete"] == "false"


def test_error_handling_loses_nothing(connector):
    # A source connector has no dead-letter queue; tolerating errors would skip records silently.
    assert connector["errors.tolerance"] == "none"
    assert not [key for key in connector if key.startswith("errors.deadletterqueue")]
    assert connector["errors.log.enable"] == "true"
    assert connector["errors.log.include.messages"] == "true"
    assert int(connector["errors.retry.timeout"]) > 0
    assert int(connector["errors.retry.delay.max.ms"]) > 0
    assert connector["producer.override.acks"] == "all"
    assert connector["producer.override.enable.idempotence"] == "true"


def test_connector_holds_no_secret(connector):
    assert connector["database.password"].startswith("${env:")


# --- docker-compose.yml ------------------------------------------------------------------------------


def _settings_env_names() -> set[str]:
    source = SETTINGS_SOURCE.read_text()
    return set(re.findall(r"""(?:os\.environ\.get|env_bool|env_int|env_float|env_json)\(\s*["']([A-Z0-9_]+)["']""", source))


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _procfile() -> dict[str, list[str]]:
    processes = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            processes[name.strip()] = shlex.split(command)
    return processes


def test_settings_env_names_are_found():
    names = _settings_env_names()
    assert {"DATABASE_URL", "DJANGO_SECRET_KEY", "OUTBOX_RELAY_ENABLED", "KAFKA_CONFIG", "OUTBOX_BATCH_SIZE"} <= names


def test_compose_has_the_stack(compose):
    services = compose["services"]
    assert {"kafka", "mysql", "redis", "web", "worker", "beat", "consumer", "migrate"} <= set(services)
    assert {name for name, service in services.items() if "build" in service} == APP_SERVICES | {"relay-cdc"}
    for name in ("kafka", "mysql", "redis"):
        assert "healthcheck" in services[name], name


def test_compose_kafka_is_kraft(compose):
    services = compose["services"]
    assert not [name for name, s in services.items() if "zookeeper" in name or "zookeeper" in s.get("image", "")]
    env = _environment(services["kafka"])
    assert "KAFKA_PROCESS_ROLES" in env and "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_compose_mysql_is_ready_for_cdc(compose):
    mysql = compose["services"]["mysql"]
    command = _command(mysql)
    assert "--binlog-format=ROW" in command
    assert "--binlog-row-image=FULL" in command
    assert _environment(mysql)["MYSQL_DATABASE"] == DATABASE


def test_compose_process_commands_match_the_procfile(compose):
    procfile = _procfile()
    assert set(PROCESSES) <= set(procfile)
    for name, canonical in PROCESSES.items():
        expected, actual = procfile[name], _command(compose["services"][name])
        assert expected[: len(canonical)] == canonical, f"Procfile {name}: {expected}"
        assert actual[: len(canonical)] == canonical, f"compose {name}: {actual}"
        # Same options as the Procfile; a value the Procfile leaves to the environment (${...}) may differ.
        assert len(actual) == len(expected), f"{name}: {actual} != {expected}"
        for want, got in zip(expected, actual):
            assert want == got or "${" in want, f"{name}: {actual} != {expected}"


def test_compose_migrate_runs_first(compose):
    services = compose["services"]
    command = " ".join(_command(services["migrate"]))
    assert "python manage.py migrate" in command
    assert "python manage.py kafka_topics --create" in command
    assert command.index("manage.py migrate") < command.index("kafka_topics")
    for name in PROCESSES:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_compose_app_env_is_only_what_settings_read(compose):
    known = _settings_env_names()
    services = compose["services"]
    shared = _environment(services["web"])
    for name in APP_SERVICES:
        env = _environment(services[name])
        assert set(env) <= known, f"{name}: settings.py never reads {sorted(set(env) - known)}"
        assert env == shared, f"{name} does not use the shared x-app-env"
    assert shared["DJANGO_SECRET_KEY"] == "${DJANGO_SECRET_KEY:?set DJANGO_SECRET_KEY}"
    assert urlparse(shared["DATABASE_URL"]).scheme == "mysql"
    assert urlparse(shared["DATABASE_URL"]).hostname == "mysql"
    assert urlparse(shared["DATABASE_URL"]).path == f"/{DATABASE}"
    assert shared["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert urlparse(shared["CELERY_BROKER_URL"]).hostname == "redis"
    for name in ("KAFKA_CONFIG", "KAFKA_PRODUCER_CONFIG", "KAFKA_CONSUMER_CONFIG"):
        if name in shared:
            assert isinstance(json.loads(shared[name]), dict), name


def test_compose_cdc_profile_matches_the_connector(compose, connector):
    connect = compose["services"]["connect"]
    assert connect["profiles"] == ["cdc"]
    assert any(v.split(":")[0] == "./deploy/debezium" for v in connect["volumes"])
    env = _environment(connect)
    for key, value in connector.items():
        for var in re.findall(r"\$\{env:([A-Za-z0-9_]+)\}", value):
            assert var in env, f"{key} needs {var} in the connect service"
    assert env["CONNECT_CONFIG_PROVIDERS"] == "env"
    assert env["CONNECT_CONNECTOR_CLIENT_CONFIG_OVERRIDE_POLICY"] == "All"


def test_compose_relay_cdc_service_runs_the_connector_from_the_cdc_image(compose, connector):
    services = compose["services"]
    relay_cdc = services["relay-cdc"]
    assert relay_cdc["profiles"] == ["relay-cdc"]
    assert relay_cdc["build"]["target"] == "cdc"
    assert _command(relay_cdc) == ["python", "manage.py", "relay_cdc"]
    env = _environment(relay_cdc)
    assert {k: v for k, v in env.items() if k in _environment(services["web"])} == _environment(services["web"])
    for key, value in connector.items():
        for var in re.findall(r"\$\{env:([A-Za-z0-9_]+)\}", value):
            # BOOTSTRAP_SERVERS defaults to the app's KAFKA_BOOTSTRAP_SERVERS.
            assert var in env or var == "BOOTSTRAP_SERVERS", f"{key} needs {var} in the relay-cdc service"
    assert "relay-cdc" in services["cdc-db-user"]["profiles"]


# --- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_copies_every_local_app_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.MULTILINE))
    local_apps = {app for app in settings.INSTALLED_APPS if "." not in app and (ROOT / app).is_dir()}
    local_apps.discard("tests")
    assert local_apps, "no local apps found"
    missing = {app for app in local_apps | {"project", "manage.py"} if app not in copied}
    assert not missing, f"the image would miss {sorted(missing)}"
    assert "collectstatic" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    cmd = json.loads(re.findall(r"^CMD (.+)$", text, flags=re.MULTILINE)[-1])
    assert cmd[:2] == PROCESSES["web"]


def test_dockerfile_cdc_target_adds_the_engine_and_the_default_image_stays_without():
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]
    named = {stage.split()[2] if " AS " in stage.splitlines()[0] else None: stage for stage in stages}
    cdc, default = named["cdc"], stages[-1]
    assert "requirements-cdc.txt" in named["build-cdc"] and "--require-hashes" in named["build-cdc"]
    assert "COPY --from=build-cdc /opt/venv" in cdc
    assert "default-jre-headless" in cdc and "libmariadb-java" in cdc
    assert "deploy/debezium/outbox-connector.json" in cdc
    assert re.findall(r"^USER (\S+)", cdc, flags=re.MULTILINE)[-1] == "app"
    assert json.loads(re.findall(r"^CMD (.+)$", cdc, flags=re.MULTILINE)[-1]) == ["python", "manage.py", "relay_cdc"]
    assert " AS " not in default.splitlines()[0] and "cdc" not in default and "java" not in default
