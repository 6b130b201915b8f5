"""Reading a consumed message: limits, parsers, headers; whatever cannot be read is poison."""

import uuid

import pytest

from inbox.messages import PoisonMessage, RawMessage, inbound_event_parse, message_read


def event_headers():
    return {"id": str(uuid.uuid4()), "eventType": "OrderCreated", "aggregateType": "order",
            "aggregateId": "1", "occurredAt": "2026-01-01T00:00:00+00:00"}


@pytest.mark.parametrize(("value", "expected"), [
    (b'{"customer_id": "c-1", "total": "1.00"}', {"customer_id": "c-1", "total": "1.00"}),
    # What orjson refuses or reads otherwise (a float for an integer beyond 64 bits) and the standard library
    # takes: the payload means the same whichever parser read it.
    (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    (b'{"n": -9223372036854775809, "id": "12345678901234567890"}', {"n": -9223372036854775809,
                                                                     "id": "12345678901234567890"}),
    (b'{"x": NaN}', "nan"),
])
def test_a_payload_parses_as_the_standard_library_reads_it(value, expected):
    headers = [(k, v.encode()) for k, v in event_headers().items()]
    event = inbound_event_parse(RawMessage("t", 0, 0, b"1", value, headers))
    if expected == "nan":
        assert event.payload["x"] != event.payload["x"]  # NaN
    else:
        assert event.payload == expected
    assert event.headers == event_headers() | {"id": event.event_id}  # every header, decoded when asked for


@pytest.mark.parametrize("value", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b""])
def test_a_value_no_parser_takes_as_an_object_is_poison(value):
    with pytest.raises(PoisonMessage):
        inbound_event_parse(RawMessage("t", 0, 0, b"1", value, [(k, v.encode()) for k, v in event_headers().items()]))


class _MessageWithUnreadableHeaders:
    """A header name that is not UTF-8 (confluent-kafka cannot produce one, other clients can): the client's
    headers() raises when it decodes the name."""

    def topic(self): return "t"
    def partition(self): return 0
    def offset(self): return 3
    def key(self): return b"1"
    def value(self): return b"{}"
    def error(self): return None
    def headers(self): raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_a_message_whose_headers_cannot_be_read_is_poison_not_a_crash():
    parsed, raw = message_read(_MessageWithUnreadableHeaders())
    assert isinstance(parsed, PoisonMessage) and "header" in str(parsed)
    assert (raw.offset, raw.value, raw.headers) == (3, b"{}", [])
