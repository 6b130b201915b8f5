"""Event handlers by event type. A handler takes (payload, headers) and runs inside the inbox transaction."""

from typing import Callable

Handler = Callable[[dict, dict], None]

_handlers: dict[str, Handler] = {}


def handles(event_type: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        if event_type in _handlers and _handlers[event_type] is not handler:
            raise ValueError(f"a handler for {event_type} is already registered")
        _handlers[event_type] = handler
        return handler

    return register


def handler_for(event_type: str) -> Handler | None:
    return _handlers.get(event_type)
