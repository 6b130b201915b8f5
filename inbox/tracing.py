"""The consumer's span, when tracing is on: one CONSUMER "process" span per batch, linked to each message's
trace (its traceparent header: the relay's producer span), within which the batch's dedupe and handler writes
run. Duplicates skipped and dead letters show as its events. A span keeps OTEL_SPAN_LINK_COUNT_LIMIT links
(128 by default): raise it to INBOX_BATCH_SIZE to keep every message's link in a full batch."""

from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from ops import tracing

from . import kafka


def _trace_headers(message: kafka.Message) -> tuple[str, str]:
    parent = state = ""
    for name, value in message.headers() or []:
        if name == "traceparent" and value:
            parent = value.decode("ascii", errors="replace")
        elif name == "tracestate" and value:
            state = value.decode("ascii", errors="replace")
    return parent, state


@contextmanager
def consumer_span(group_id: str, messages: list[kafka.Message]):
    links = []
    for message in messages:
        context = tracing.context_from(*_trace_headers(message))
        if context is not None:
            links.append(Link(trace.get_current_span(context).get_span_context(),
                              {"messaging.kafka.offset": message.offset()}))
    topics = sorted({message.topic() for message in messages})
    attributes = {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": topics[0] if len(topics) == 1 else ",".join(topics),
        "messaging.consumer.group.name": group_id,
        "messaging.batch.message_count": len(messages),
    }
    if len(messages) == 1:
        (message,) = messages
        attributes["messaging.destination.partition.id"] = str(message.partition())
        attributes["messaging.kafka.offset"] = message.offset()
        if message.key() is not None:
            attributes["messaging.kafka.message.key"] = message.key().decode("utf-8", errors="replace")
    name = f"process {attributes['messaging.destination.name']}"
    with tracing.tracer().start_as_current_span(name, kind=SpanKind.CONSUMER, links=links,
                                                attributes=attributes) as span:
        yield span
