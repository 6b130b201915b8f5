"""What a consumed message is, and how one is read: the limits, the headers the consumer needs, the payload.

Reading never raises anything but PoisonMessage to the loop: message_read turns whatever a message makes the
client or a parser raise into poison, dead-lettered with the message's bytes (README "The consumer").
"""

import json
import re
import uuid
from typing import NamedTuple

import orjson

from ops.json_limits import bounded_number

from . import kafka
from .registry import handler_for

class PoisonMessage(Exception):
    """A message no retry can fix: it goes to the DLQ at once."""


# A NamedTuple, not a frozen dataclass: one per message consumed, at a third of the cost to build.
class RawMessage(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def text_headers(self) -> dict[str, str]:
        return decode_headers(self.headers)


def decode_headers(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    try:
        return {name: value.decode() for name, value in headers}  # the usual case, at a third of the cost
    except (AttributeError, UnicodeDecodeError):  # a header without a value, or not UTF-8
        return {name: (value or b"").decode("utf-8", errors="replace") for name, value in headers}


class InboundEvent:
    """An event as handlers see it. `headers` (text) is decoded when first asked for: a message carries a dozen
    headers (Debezium-style, CloudEvents, trace), and the consumer itself reads only two of them."""

    __slots__ = ("event_id", "event_type", "payload", "_headers", "_raw_headers")

    def __init__(self, event_id: str, event_type: str, payload: dict, headers: dict[str, str] | None = None, *,
                 raw_headers: list[tuple[str, bytes]] = ()):
        self.event_id, self.event_type, self.payload = event_id, event_type, payload
        self._headers, self._raw_headers = headers, raw_headers

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = decode_headers(self._raw_headers)
        return self._headers

    def __repr__(self) -> str:
        return f"InboundEvent({self.event_type} {self.event_id})"


def _canonical_id(event_id: str) -> str:
    """One spelling per UUID: the relay sends it with dashes, a CDC connector on MySQL without."""
    if len(event_id) == 36 and event_id.islower() and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-":
        return event_id  # already canonical (the usual case; parsing it costs a tenth of the whole parse)
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return event_id  # not a UUID: dedupe on the id as sent


def inbound_event_parse(raw: RawMessage) -> InboundEvent:
    # The relay's and the CDC connector's own headers, else CloudEvents' (a producer that sends only those). Of
    # a message's dozen headers these are the only ones the consumer reads: the others are decoded on demand.
    if len(raw.headers) > MAX_HEADERS:
        raise PoisonMessage(f"more than {MAX_HEADERS} headers ({len(raw.headers)})")
    event_id = event_type = ce_id = ce_type = None
    for name, value in raw.headers:
        if name == "id":
            event_id = value
        elif name == "eventType":
            event_type = value
        elif name == "ce_id":
            ce_id = value
        elif name == "ce_type":
            ce_type = value
    event_id = _header_text(event_id) or _header_text(ce_id)
    event_type = _header_text(event_type) or _header_text(ce_type)
    if not event_id:
        raise PoisonMessage("missing 'id' header (or CloudEvents' 'ce_id')")
    event_id = _canonical_id(event_id)
    if len(event_id) > 64:
        raise PoisonMessage("'id' header longer than 64 characters")
    if not event_type:
        raise PoisonMessage("missing 'eventType' header (or CloudEvents' 'ce_type')")
    if handler_for(event_type) is None:
        raise PoisonMessage(f"no handler for event type {event_type!r}")
    payload = _json_object(raw.value)
    return InboundEvent(event_id, event_type, payload, raw_headers=raw.headers)


def _header_text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace").strip() if value else ""


# 19 digits in a row: maybe an integer beyond 64 bits, which orjson would read as a float (it keeps only 17 of
# its digits). Such a document (or one with a long digit string) is left to the standard library.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


# Limits on what a message may carry (README "The consumer"): beyond them it is poison, dead-lettered unread.
MAX_VALUE_BYTES = 512 * 1024
MAX_HEADERS = 64
MAX_NUMBER_DIGITS = 100  # the standard library's reading; orjson reads numbers into 64-bit values anyway
_BOUNDED_INT, _BOUNDED_FLOAT = bounded_number(int, MAX_NUMBER_DIGITS), bounded_number(float, MAX_NUMBER_DIGITS)


def _json_object(value: bytes | None) -> dict:
    value = value or b""
    if len(value) > MAX_VALUE_BYTES:
        raise PoisonMessage(f"value larger than {MAX_VALUE_BYTES} bytes ({len(value)})")
    try:
        # What orjson refuses (NaN, Infinity, nesting beyond 1,024 levels) or may not keep, the standard library
        # decides: a payload means the same whichever parser read it.
        payload = _orjson_or_none(value)
        if payload is None:  # (or the document was null: the standard library says so too)
            payload = json.loads(value.decode(), parse_int=_BOUNDED_INT,
                                 parse_float=_BOUNDED_FLOAT)  # JSON between systems is UTF-8 (RFC 8259)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise PoisonMessage(f"value is not JSON: {exc}") from exc
    except RecursionError:
        raise PoisonMessage("value is not JSON this consumer reads: nested too deeply") from None
    if not isinstance(payload, dict):
        raise PoisonMessage("value is not a JSON object")
    return payload


def _orjson_or_none(value: bytes):
    if _LONG_DIGITS.search(value):
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


# Errors the client reports for one record it could not read (its offset is the record's): poison. Every other
# error message (a fetch error, its offset the next position, not a record) is only logged.
UNREADABLE_RECORD_CODES = frozenset({kafka.KafkaError._BAD_MSG, kafka.KafkaError._BAD_COMPRESSION})


def message_read(message: kafka.Message) -> tuple[InboundEvent | PoisonMessage, RawMessage]:
    """Whatever reading a message raises makes it poison: no message can stop the consumer."""
    try:
        headers, unreadable = message.headers() or [], None
    except Exception:  # a header name that is not UTF-8: the client cannot hand the headers over
        headers, unreadable = [], "headers the client cannot read (a header name that is not UTF-8)"
    raw = RawMessage(topic=message.topic(), partition=message.partition(), offset=message.offset(),
                     key=message.key(), value=message.value(), headers=headers)
    if unreadable:
        return PoisonMessage(unreadable), raw
    if message.error() is not None:
        return PoisonMessage(f"the Kafka client reported the record as an error: {message.error()}"), raw
    try:
        return inbound_event_parse(raw), raw
    except PoisonMessage as exc:
        return exc, raw
    except Exception as exc:
        return PoisonMessage(f"unreadable: {exc!r}"[:1000]), raw


def has_record_position(message: kafka.Message) -> bool:
    return bool(message.topic()) and (message.offset() or 0) >= 0


def next_offsets(messages: list[kafka.Message]) -> list[kafka.TopicPartition]:
    """The offsets to commit once `messages` are applied: one past the last of each partition."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic(), message.partition())
        last[key] = max(last.get(key, -1), message.offset())
    return [kafka.TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]
