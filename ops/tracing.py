"""OpenTelemetry tracing, configured only by the standard OTEL_* environment variables.

Off unless an exporter is asked for: `OTEL_TRACES_EXPORTER` (`otlp`, `console`, both comma-separated, or
`none`); when it is unset, `otlp` if an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), else none. Off, nothing is instrumented and the outbox, relay and consumer
skip every tracing call: it costs nothing. The SDK itself reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_PROPAGATORS` (for incoming HTTP requests) and the OTLP exporter's variables.

The trace context travels with an event as W3C Trace Context whatever OTEL_PROPAGATORS says: it is stored with
the outbox row at enqueue (inside the request's span) and sent as the Kafka message's `traceparent` and
`tracestate` headers, which is what the messaging conventions and CloudEvents' distributed-tracing extension use.
"""

import logging
import os

from django.core.exceptions import ImproperlyConfigured
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_W3C = TraceContextTextMapPropagator()
_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_enabled = False


def enabled() -> bool:
    return _enabled


def exporter_names() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        names = "otlp" if any(os.environ.get(name) for name in _OTLP_ENDPOINTS) else "none"
    names = [name.strip().lower() for name in names.split(",") if name.strip()]
    unknown = set(names) - {"otlp", "console", "none"}
    if unknown:
        raise ImproperlyConfigured(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {sorted(unknown)}; "
                                   "use otlp, console or none")
    return [name for name in names if name != "none"]


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in (None, "", "http/protobuf"):
        raise ImproperlyConfigured(f"OTLP protocol {protocol!r} is not supported here: use http/protobuf "
                                   "(a collector's port 4318)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from its OTEL_EXPORTER_OTLP_* variables


def tracing_setup(*, process: str, django: bool = False, celery: bool = False) -> bool:
    """Set up tracing for this process if the environment asks for it, once. `process` (web, worker, beat,
    consumer, relay) names the service when OTEL_SERVICE_NAME does not. Returns whether tracing is on."""
    global _enabled
    if _enabled:
        return True
    exporters = [_exporter(name) for name in exporter_names()]
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"orders-{process}"}))
    provider = TracerProvider(resource=resource)
    for span_exporter in exporters:
        # Spans leave from a thread of their own, in batches: never on the request's or the relay's path.
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    if django:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        DjangoInstrumentor().instrument()
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    _enabled = True
    logger.info("tracing on: %s", ", ".join(type(e).__name__ for e in exporters))
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer("orders-outbox")


def current_trace_headers() -> tuple[str, str]:
    """(traceparent, tracestate) of the active span, as W3C Trace Context; empty strings when there is none."""
    headers = dict(trace_headers_of())
    return headers.get("traceparent", ""), headers.get("tracestate", "")


def trace_headers_of(context: Context | None = None) -> list[tuple[str, str]]:
    """The traceparent/tracestate headers for `context` (default: the active one)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return [(name, carrier[name]) for name in ("traceparent", "tracestate") if carrier.get(name)]


def context_from(traceparent: str, tracestate: str = "") -> Context | None:
    """The remote context a stored or received traceparent names; None when there is none (or it is invalid)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = _W3C.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None
