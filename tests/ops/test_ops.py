import json
import logging

import pytest
from django.test import Client

from ops.logging import JsonFormatter
from outbox.models import OutboxEvent
from relay.services import relay_publish_batch
from tests.outbox.test_admin import staff_client
from tests.processes import suite_env
from tests.relay.helpers import ORDER, relay_until

pytestmark = pytest.mark.django_db(transaction=True)


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_healthz_answers_without_checking_dependencies():
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_database_redis_and_kafka(broker):
    body = Client().get("/readyz").json()
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {"database": True, "redis": True, "kafka": True}


def test_readyz_names_kafka_when_the_broker_is_down(broker_outage):
    broker_outage.stop()
    response = Client().get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["kafka"]["ok"] is False and checks["kafka"]["error"]
    assert checks["database"]["ok"] and checks["redis"]["ok"]


def test_metrics_show_pending_events_and_published_counter(api, fast_retries):
    client = Client()
    published_before = metric_value(client.get("/metrics").content.decode(), "outbox_events_published_total")
    api.post("/api/orders/", ORDER, format="json")
    pending = client.get("/metrics").content.decode()
    assert metric_value(pending, "outbox_events_pending") == 1
    assert metric_value(pending, "outbox_oldest_pending_age_seconds") >= 0

    relay_until(lambda: OutboxEvent.objects.filter(status="sent").exists(), timeout=15, message="sent")

    after = client.get("/metrics").content.decode()
    assert metric_value(after, "outbox_events_pending") == 0
    assert metric_value(after, "outbox_events_published_total") == published_before + 1
    assert metric_value(after, "outbox_publish_latency_seconds_count") >= 1


def test_relay_log_lines_carry_event_order_and_attempt(api, broker_outage, fast_retries, caplog):
    broker_outage.stop()
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]
    event = OutboxEvent.objects.get()

    with caplog.at_level(logging.INFO, logger="relay.retries"):
        relay_publish_batch()

    (record,) = [r for r in caplog.records if r.getMessage().startswith("publish failed")]
    line = json.loads(JsonFormatter().format(record))
    assert line["event_id"] == str(event.event_id)
    assert line["order_id"] == str(order_id)
    assert line["attempt"] == 1
    assert line["level"] == "INFO" and "retrying" in line["message"]


def test_admin_overview_shows_orders_held_behind_a_failing_event(api, broker_outage, fast_retries, django_user_model):
    broker_outage.stop()
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]
    relay_publish_batch()  # fails: the OrderCreated goes into backoff
    api.post(f"/api/orders/{order_id}/cancel/")  # held behind it

    _, client = staff_client(django_user_model, "ops", "view_outboxevent")
    page = client.get("/admin/outbox/outboxevent/overview/")

    assert page.status_code == 200
    held = page.context["overview"]["held"]
    assert [(h["aggregate_id"], h["event_type"], h["events_behind"]) for h in held] == [(str(order_id), "OrderCreated", 1)]
    assert page.context["overview"]["counts"]["pending"] == 2
    # The health of what the relay needs, as /readyz sees it: the broker is the one down.
    checks = page.context["checks"]
    assert checks["kafka"]["ok"] is False and checks["database"]["ok"] and checks["redis"]["ok"]
    assert "<strong>failing</strong>" in page.content.decode()
    # Each event's order id links to the order.
    listing = client.get("/admin/outbox/outboxevent/").content.decode()
    assert f'href="/admin/orders/order/{order_id}/change/"' in listing


def test_admin_overview_shows_what_each_consumer_group_applied(django_user_model):
    from inbox.models import ProcessedEvent

    ProcessedEvent.objects.create(group_id="order-stats", event_id="e-1", event_type="OrderCreated", topic="t",
                                  partition=0, offset=0)
    ProcessedEvent.objects.create(group_id="order-stats", event_id="e-2", event_type="OrderCreated", topic="t",
                                  partition=0, offset=1)
    _, client = staff_client(django_user_model, "ops", "view_outboxevent")
    page = client.get("/admin/outbox/outboxevent/overview/")
    (group,) = page.context["consumers"]
    assert (group["group"], group["dead_letters"]) == ("order-stats", 0)
    assert group["last_applied"] == ProcessedEvent.objects.get(event_id="e-2").processed_at


def test_admin_overview_requires_view_permission(django_user_model):
    _, client = staff_client(django_user_model, "nobody")
    assert client.get("/admin/outbox/outboxevent/overview/").status_code == 403


def test_metrics_of_a_separate_relay_process_are_served_by_the_web(api, broker, settings, monkeypatch, tmp_path):
    """Multiprocess mode: a relay in another process (as a Celery worker is) counts into the shared directory,
    and the web's /metrics serves the sum."""
    import subprocess
    import sys

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    api.post("/api/orders/", ORDER, format="json")
    relay = subprocess.run([sys.executable, "manage.py", "relay_outbox"], env=suite_env(broker), capture_output=True,
                           text=True, timeout=60)
    assert "published 1 event" in relay.stdout, relay.stdout + relay.stderr

    text = Client().get("/metrics").content.decode()
    assert metric_value(text, "outbox_events_published_total") == 1
    assert metric_value(text, "outbox_events_pending") == 0
