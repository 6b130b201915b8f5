"""THE APPROACH THIS PRODUCT REPLACES, for the chaos comparison only (`python -m chaos.run --compare`).

The web app with the outbox taken out: a request commits the order, and after the commit a background thread of
the web process publishes the event straight to Kafka, 3 attempts 1 s apart, then logs an error and gives up.
This is what our users ran before ("the commit succeeded, the publish failed"). It lives with the chaos tooling,
which the image does not ship (the Dockerfile copies only the product's apps), and it refuses to load unless
CHAOS_DIRECT_PUBLISH_ACKS is set, so no deployment can serve it by mistake.

    gunicorn chaos.direct_publish:application   with CHAOS_DIRECT_PUBLISH_ACKS=1 or all

- acks=1: the producer's defaults of old, no idempotence (a retried send can write twice or out of order);
- all: acks=all and the idempotent producer, the settings the relay uses (rebuilt after a fatal error, as the
  relay's is).
Each attempt waits up to DELIVERY_TIMEOUT seconds for the broker's report (message.timeout.ms), as such code
bounds it so that its thread does not hang. The message is the one the relay would send for the same event
(same key, value and headers), so the checker and the consumer read both alike.
"""

import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from project.wsgi import application  # noqa: F401  (sets Django up first)

from confluent_kafka import KafkaError, KafkaException, Producer  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.serializers.json import DjangoJSONEncoder  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

import orders.services  # noqa: E402
from relay.claim import Claimed  # noqa: E402

logger = logging.getLogger("chaos.direct_publish")

ATTEMPTS = 3
PAUSE = 1.0
DELIVERY_TIMEOUT = 2.0

ACKS = os.environ.get("CHAOS_DIRECT_PUBLISH_ACKS", "")
if ACKS not in ("1", "all"):
    raise ImproperlyConfigured("chaos.direct_publish is the chaos run's baseline; set CHAOS_DIRECT_PUBLISH_ACKS=1|all")


def producer_config(acks: str) -> dict:
    config = {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "partitioner": "murmur2_random",
        "linger.ms": 2,
        "message.timeout.ms": int(DELIVERY_TIMEOUT * 1000),
        "request.timeout.ms": int(DELIVERY_TIMEOUT * 1000),
    }
    if acks == "all":
        config.update({"acks": "all", "enable.idempotence": True})
    else:
        config.update({"acks": "1", "enable.idempotence": False})
    return config


class DirectPublisher:
    """One per web process: a queue of committed events and a thread that sends them one by one."""

    def __init__(self, acks: str):
        self.acks = acks
        self._queue: queue.Queue = queue.Queue()
        self._producer: Producer | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._retired: list[Producer] = []

    def submit(self, message) -> None:
        with self._lock:
            if self._pid != os.getpid():  # gunicorn forked: a thread and a producer of this process's own
                self._pid = os.getpid()
                self._producer = Producer(producer_config(self.acks))
                self._queue = queue.Queue()
                threading.Thread(target=self._send_forever, name="direct-publish", daemon=True).start()
        self._queue.put(message)

    def _send_forever(self) -> None:
        while True:
            message = self._queue.get()
            self.send(message)

    def send(self, message) -> bool:
        error = None
        for attempt in range(1, ATTEMPTS + 1):
            outcome: list = []
            try:
                self._producer.produce(message.topic, key=message.key, value=message.value, headers=message.headers,
                                       on_delivery=lambda err, _msg: outcome.append(err))
                self._producer.flush(DELIVERY_TIMEOUT + 1)
            except Exception as exc:  # a full local queue, a refused message
                outcome.append(exc)
            error = outcome[0] if outcome else "no delivery report"
            if error is None:
                return True
            logger.warning("publish attempt %d of %d failed: %s", attempt, ATTEMPTS, error)
            if _fatal(error):
                # A fenced idempotent producer never sends again (the dev broker forgets producer ids when it
                # restarts empty). Careful code builds a new one, as the relay does: the baseline's losses are then
                # its approach's, not a dead client's.
                # The old one is kept, not destroyed: destroying a producer in that state was seen to block the
                # thread for good (every later event then "lost" by a stuck client).
                self._retired.append(self._producer)
                self._producer = Producer(producer_config(self.acks))
            if attempt < ATTEMPTS:
                time.sleep(PAUSE)
        logger.error("event %s of order %s not published after %d attempts: %s",
                     dict(message.headers)["id"], message.key, ATTEMPTS, error)
        return False


def _fatal(error) -> bool:
    if isinstance(error, KafkaException):
        error = error.args[0]
    # produce() on a producer in the fatal state raises _FATAL, an error that is not itself flagged fatal
    return isinstance(error, KafkaError) and (error.fatal() or error.code() == KafkaError._FATAL)


publisher = DirectPublisher(ACKS)


def publish_after_commit(*, aggregate_type: str, aggregate_id, event_type: str, payload: dict[str, Any]) -> None:
    """Stands in for outbox_enqueue: nothing is written with the order; the event is sent after the commit."""
    event = Claimed(
        id=0, event_id=str(uuid.uuid4()), aggregate_type=aggregate_type, aggregate_id=str(aggregate_id),
        event_type=event_type, payload=json.dumps(payload, cls=DjangoJSONEncoder),
        occurred_at=timezone.now().replace(tzinfo=None), attempts=0,
    )
    message = event.message()
    transaction.on_commit(lambda: publisher.submit(message))


orders.services.outbox_enqueue = publish_after_commit
