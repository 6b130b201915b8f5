"""One order followed from the HTTP request to the consumer's write, with the SDK's in-memory exporter, through
the real database and broker; and the OTEL_* configuration of a real process."""

import json
import subprocess
import sys
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured
from opentelemetry import trace
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inbox.consumer import EventConsumer
from ops import tracing
from outbox.models import OutboxEvent
from relay.services import relay_run
from tests.kafka_tools import read_topic
from tests.processes import suite_env

ORDER = {"customer_id": "c-traced", "items": [{"sku": "A-1", "quantity": 1, "unit_price": "3.00"}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="session")
def span_exporter():
    """OpenTelemetry takes one tracer provider per process: the suite's, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def traced(span_exporter, monkeypatch):
    """Tracing on for one test, as tracing_setup(django=True) turns it on in the web process."""
    span_exporter.clear()
    monkeypatch.setattr(tracing, "_enabled", True)
    DjangoInstrumentor().instrument()
    yield span_exporter
    DjangoInstrumentor().uninstrument()


@pytest.fixture
def topic(broker, settings):
    prefix = f"traced-{uuid.uuid4().hex[:8]}."
    broker.create_topics(prefix + "order", partitions=1)
    settings.OUTBOX_TOPIC_PREFIX = prefix
    return prefix + "order"


def spans(exporter, kind):
    return [span for span in exporter.get_finished_spans() if span.kind == kind]


def test_the_requests_trace_reaches_the_row_the_message_the_relays_span_and_the_consumers(traced, api, broker, topic):
    response = api.post("/api/orders/", ORDER, format="json", HTTP_TRACEPARENT=INCOMING)
    assert response.status_code == 201
    (server,) = spans(traced, SpanKind.SERVER)
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the request continued the caller's trace

    row = OutboxEvent.objects.get()
    assert row.trace_parent.split("-")[1] == TRACE_ID
    assert row.trace_parent.split("-")[2] == format(server.context.span_id, "016x")  # enqueued inside the request

    assert relay_run(budget=5).sent == 1
    (producer,) = spans(traced, SpanKind.PRODUCER)
    assert format(producer.context.trace_id, "032x") == TRACE_ID and producer.parent.span_id == server.context.span_id
    assert producer.name == f"send {topic}"
    assert producer.attributes["messaging.system"] == "kafka"
    assert producer.attributes["messaging.operation.name"] == "send"
    assert producer.attributes["messaging.destination.name"] == topic
    assert producer.attributes["messaging.destination.partition.id"] == "0"
    assert producer.attributes["messaging.kafka.message.key"] == str(response.json()["id"])
    assert producer.attributes["messaging.message.id"] == str(row.event_id)

    (record,) = read_topic(broker.bootstrap, topic, until=lambda rs: len(rs) >= 1)
    assert record.headers["traceparent"] == f"00-{TRACE_ID}-{producer.context.span_id:016x}-01"

    consumer = EventConsumer(group_id=f"traced-{uuid.uuid4().hex[:6]}", topics=[topic], dlq_topic="order-stats.dlq",
                             max_attempts=2, backoff_base=0.01)
    consumer.run(max_messages=1, idle_timeout=30)
    (process,) = spans(traced, SpanKind.CONSUMER)
    assert process.name == f"process {topic}"
    assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [
        (producer.context.trace_id, producer.context.span_id)]
    assert process.attributes["messaging.consumer.group.name"] == consumer.group_id
    assert process.attributes["messaging.operation.name"] == "process"
    assert consumer.stats["applied"] == 1


def test_a_request_without_traceparent_starts_a_trace_of_its_own(traced, api):
    api.post("/api/orders/", ORDER, format="json")
    (server,) = spans(traced, SpanKind.SERVER)
    assert server.parent is None
    assert OutboxEvent.objects.get().trace_parent.split("-")[1] == format(server.context.trace_id, "032x")


def test_a_failed_publish_shows_on_the_producer_span(traced, api, broker, settings):
    settings.OUTBOX_TOPIC_PREFIX = "bad topic name "  # the broker refuses it: dead-lettered at once
    api.post("/api/orders/", ORDER, format="json")
    relay_run(budget=5)
    (producer,) = spans(traced, SpanKind.PRODUCER)
    assert producer.status.status_code.name == "ERROR"
    assert [event.name for event in producer.events] == ["dead-lettered"]


def test_with_tracing_off_nothing_is_stored_and_no_header_is_sent(api, broker, topic):
    assert not tracing.enabled()
    api.post("/api/orders/", ORDER, format="json", HTTP_TRACEPARENT=INCOMING)
    assert OutboxEvent.objects.get().trace_parent == ""
    relay_run(budget=5)
    (record,) = read_topic(broker.bootstrap, topic, until=lambda rs: len(rs) >= 1)
    assert "traceparent" not in record.headers


@pytest.mark.parametrize("env, expected", [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
    ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["console", "otlp"]),
])
def test_the_exporters_come_from_the_standard_variables(monkeypatch, env, expected):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.exporter_names() == expected


def test_an_unknown_exporter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ImproperlyConfigured, match="unknown exporter"):
        tracing.exporter_names()


def test_a_real_relay_process_exports_its_spans_as_the_environment_says(api, broker, topic):
    """relay_outbox with OTEL_TRACES_EXPORTER=console and OTEL_SERVICE_NAME: the producer span of the stored trace,
    under that service name, on its stdout."""
    api.post("/api/orders/", ORDER, format="json")
    OutboxEvent.objects.update(trace_parent=INCOMING)  # as a traced web process would have stored it
    done = subprocess.run(
        [sys.executable, "manage.py", "relay_outbox", "--until-empty"], capture_output=True, text=True, timeout=60,
        env=suite_env(broker, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="orders-relay-under-test",
                      OUTBOX_TOPIC_PREFIX=topic[: -len("order")]))
    assert done.returncode == 0, done.stderr[-2000:]
    decoder, text, found = json.JSONDecoder(), done.stdout, []
    index = text.find("{")
    while index != -1:
        span, end = decoder.raw_decode(text, index)
        found.append(span)
        index = text.find("{", end)
    (producer,) = [s for s in found if s.get("kind") == "SpanKind.PRODUCER"]
    assert producer["context"]["trace_id"] == "0x" + TRACE_ID
    assert producer["resource"]["attributes"]["service.name"] == "orders-relay-under-test"
    assert producer["attributes"]["messaging.destination.name"] == topic


def test_a_writer_that_does_not_name_the_trace_columns_still_inserts():
    """The columns have a database default: an older release during a rolling deploy, or a tool, still writes."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {OutboxEvent._meta.db_table} (event_id, aggregate_type, aggregate_id, event_type, "
                       "payload, occurred_at, available_at, status, attempts, last_error, kafka_partition, kafka_offset) "
                       "VALUES (%s, 'order', '1', 'OrderCreated', '{}', NOW(6), NOW(6), 'pending', 0, '', -1, -1)",
                       [uuid.uuid4().hex])
    assert OutboxEvent.objects.get().trace_parent == ""
