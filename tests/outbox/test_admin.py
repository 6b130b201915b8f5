import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.test import Client

from outbox.models import FailedEvent, OutboxEvent
from tests.kafka_tools import high_watermarks, read_topic
from tests.relay.helpers import TOPIC, relay_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_retries")]


def staff_client(django_user_model, username, *perms):
    user = django_user_model.objects.create_user(username=username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=perms))
    client = Client()
    client.force_login(user)
    return user, client


def test_requeue_from_admin_delivers_with_original_event_id(dead_event, django_user_model, broker):
    operator, client = staff_client(django_user_model, "ops", "view_failedevent", "requeue_failedevent")
    failed = FailedEvent.objects.get()
    start = high_watermarks(broker.bootstrap, TOPIC)

    listing = client.get("/admin/outbox/failedevent/")
    assert listing.status_code == 200 and str(failed.event_id) in listing.content.decode()
    assert 'value="requeue"' in listing.content.decode()
    response = client.post("/admin/outbox/failedevent/", {"action": "requeue", "_selected_action": [failed.pk]})
    assert response.status_code == 302

    failed.refresh_from_db()
    assert failed.status == FailedEvent.Status.REQUEUED
    assert failed.requeued_by == operator and failed.requeued_at is not None
    relay_until(lambda: OutboxEvent.objects.get().status == "sent", timeout=20, message="requeued event sent")
    (record,) = read_topic(broker.bootstrap, TOPIC, start=start, keys={dead_event.aggregate_id},
                           until=lambda rs: len(rs) >= 1)
    assert record.headers["id"] == str(dead_event.event_id)


def test_staff_without_the_permission_cannot_requeue(dead_event, django_user_model):
    _, client = staff_client(django_user_model, "viewer", "view_failedevent", "view_outboxevent")
    failed = FailedEvent.objects.get()

    assert 'value="requeue"' not in client.get("/admin/outbox/failedevent/").content.decode()
    client.post("/admin/outbox/failedevent/", {"action": "requeue", "_selected_action": [failed.pk]})
    client.post("/admin/outbox/outboxevent/", {"action": "requeue", "_selected_action": [dead_event.pk]})

    failed.refresh_from_db()
    dead_event.refresh_from_db()
    assert failed.status == FailedEvent.Status.DEAD_LETTERED and failed.requeued_by is None
    assert dead_event.status == "dead"


def test_non_staff_cannot_open_the_admin(django_user_model):
    user = django_user_model.objects.create_user(username="plain", password="pw")
    client = Client()
    client.force_login(user)
    assert client.get("/admin/outbox/failedevent/").status_code == 302  # to the login page


def test_requeue_dead_outbox_row_from_its_admin_page(dead_event, django_user_model):
    _, client = staff_client(django_user_model, "ops", "view_outboxevent", "requeue_failedevent")
    client.post("/admin/outbox/outboxevent/", {"action": "requeue", "_selected_action": [dead_event.pk]})
    dead_event.refresh_from_db()
    assert dead_event.status == "pending" and dead_event.attempts == 0
    relay_until(lambda: OutboxEvent.objects.get().status == "sent", timeout=20, message="sent")


def test_requeue_command_for_operators_without_the_admin(dead_event, django_user_model):
    operator = django_user_model.objects.create_user(username="ops")
    call_command("requeue_failed_events", str(dead_event.event_id), "--user", "ops")
    failed = FailedEvent.objects.get()
    assert failed.status == FailedEvent.Status.REQUEUED and failed.requeued_by == operator
    relay_until(lambda: OutboxEvent.objects.get().status == "sent", timeout=20, message="sent")


def test_failed_event_detail_shows_payload_and_headers(dead_event, django_user_model):
    _, client = staff_client(django_user_model, "ops", "view_failedevent")
    page = client.get(f"/admin/outbox/failedevent/{FailedEvent.objects.get().pk}/change/").content.decode()
    assert "customer_id" in page and "aggregateType" in page and "bad topic name order" in page
