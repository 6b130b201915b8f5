"""Event handlers by event type. Every handler runs inside the inbox's transaction: write only to the database.

Two forms:
- `@handles("EventType")`: `(payload, headers) -> None`, called once per event;
- `@handles_batch("TypeA", "TypeB")`: `(events: list[InboundEvent]) -> None`, called with the batch's new events
  of those types, in offset order within each partition, so a projection can fold many events into few writes.
"""

from dataclasses import dataclass
from typing import Callable

Handler = Callable[[dict, dict], None]
BatchHandler = Callable[[list], None]


@dataclass(frozen=True)
class Registered:
    function: Handler | BatchHandler
    batch: bool


_handlers: dict[str, Registered] = {}


def _register(event_types: tuple[str, ...], registered: Registered) -> None:
    for event_type in event_types:
        if event_type in _handlers and _handlers[event_type].function is not registered.function:
            raise ValueError(f"a handler for {event_type} is already registered")
    for event_type in event_types:
        _handlers[event_type] = registered


def handles(event_type: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _register((event_type,), Registered(handler, batch=False))
        return handler

    return register


def handles_batch(*event_types: str) -> Callable[[BatchHandler], BatchHandler]:
    def register(handler: BatchHandler) -> BatchHandler:
        _register(event_types, Registered(handler, batch=True))
        return handler

    return register


def handler_for(event_type: str) -> Registered | None:
    return _handlers.get(event_type)
