"""The relay's spans, when tracing is on: one PRODUCER span per published event, a child of the request that
enqueued it (the context stored with the row), following OpenTelemetry's messaging conventions for Kafka. Its
context, not the request's, goes out as the message's traceparent, so the consumer's span follows the send.
A failed publish ends its span with an error status and says what happens next (a retry or a dead letter)."""

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ops import tracing

from . import kafka
from .claim import Claimed


def producer_spans(rows: list[Claimed]) -> list[trace.Span]:
    tracer = tracing.tracer()
    return [
        tracer.start_span(
            f"send {row.topic}", kind=SpanKind.PRODUCER, context=tracing.context_from(row.trace_parent, row.trace_state),
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.name": "send",
                "messaging.operation.type": "send",
                "messaging.destination.name": row.topic,
                "messaging.kafka.message.key": row.aggregate_id,
                "messaging.message.id": row.event_id,
                "messaging.outbox.attempt": row.attempts + 1,
            },
        )
        for row in rows
    ]


def message_trace_headers(span: trace.Span) -> list[tuple[str, str]]:
    """The traceparent/tracestate headers that carry the producer span to the consumer."""
    return tracing.trace_headers_of(trace.set_span_in_context(span))


def producer_spans_end(rows: list[Claimed], spans: list[trace.Span], deliveries: list[kafka.Delivery], *,
                       retried: set[int]) -> None:
    for row, span, delivery in zip(rows, spans, deliveries):
        if delivery.ok:
            span.set_attribute("messaging.destination.partition.id", str(delivery.partition))
            span.set_attribute("messaging.kafka.offset", int(delivery.offset))
        else:
            span.set_status(Status(StatusCode.ERROR, delivery.error))
            span.set_attribute("error.type", "retriable" if delivery.retriable else "refused")
            span.add_event("retry scheduled" if row.id in retried else "dead-lettered",
                           {"messaging.outbox.attempt": row.attempts + 1, "exception.message": delivery.error})
        span.end()
