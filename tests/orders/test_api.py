import json
from decimal import Decimal

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orders import services
from orders.models import IdempotencyKey, Order, OrderItem
from outbox.models import OutboxEvent

pytestmark = pytest.mark.django_db

ORDER = {"customer_id": "c-1", "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"},
                                         {"sku": "B-2", "quantity": 1, "unit_price": "0.05"}]}


def counts():
    return Order.objects.count(), OrderItem.objects.count(), OutboxEvent.objects.count()


def test_create_writes_order_items_and_one_event(api):
    response = api.post("/api/orders/", ORDER, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "created"
    assert body["total"] == "20.03"
    assert [i["sku"] for i in body["items"]] == ["A-1", "B-2"]
    assert counts() == (1, 2, 1)
    event = OutboxEvent.objects.get()
    assert (event.event_type, event.aggregate_type, event.aggregate_id) == ("OrderCreated", "order", str(body["id"]))
    assert event.status == "pending"
    assert event.payload == {
        "order_id": str(body["id"]), "customer_id": "c-1", "total": "20.03",
        "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"},
                  {"sku": "B-2", "quantity": 1, "unit_price": "0.05"}],
    }


def test_failure_after_order_insert_rolls_back_order_and_event(api, monkeypatch):
    def broken_enqueue(**kwargs):
        assert Order.objects.count() == 1  # the order row was written in this transaction
        raise RuntimeError("injected failure")

    monkeypatch.setattr(services, "outbox_enqueue", broken_enqueue)
    with pytest.raises(RuntimeError):
        api.post("/api/orders/", ORDER, format="json")
    assert counts() == (0, 0, 0)


def test_token_auth_works_and_anonymous_is_refused(user):
    anonymous = APIClient()
    assert anonymous.post("/api/orders/", ORDER, format="json").status_code == 401
    assert anonymous.get("/api/orders/").status_code == 401
    assert anonymous.get("/api/customers/c-1/stats/").status_code == 401

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    assert client.post("/api/orders/", ORDER, format="json").status_code == 201
    assert counts() == (1, 2, 1)


@pytest.mark.parametrize(
    "body, bad_fields",
    [
        ({"customer_id": "c-1"}, ["items"]),
        ({"customer_id": "c-1", "items": []}, ["items"]),
        ({"items": ORDER["items"]}, ["customer_id"]),
        ({"customer_id": "", "items": ORDER["items"]}, ["customer_id"]),
        ({"customer_id": "c-1", "items": [{"sku": "A", "quantity": -1, "unit_price": "1.00"}]}, ["items"]),
        ({"customer_id": "c-1", "items": [{"sku": "A", "quantity": 0, "unit_price": "1.00"}]}, ["items"]),
        ({"customer_id": "c-1", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.999"}]}, ["items"]),
        ({"customer_id": "c-1", "items": [{"sku": "A", "quantity": 1, "unit_price": "-1.00"}]}, ["items"]),
        ({"customer_id": "c-1", "items": [{"quantity": 1, "unit_price": "1.00"}]}, ["items"]),
        ({"customer_id": "x" * 65, "items": [{"sku": "A", "quantity": "two", "unit_price": "1"}]}, ["customer_id", "items"]),
        ({"customer_id": "c-1", "items": "A-1"}, ["items"]),
    ],
)
def test_invalid_input_is_400_naming_each_bad_field_and_writes_nothing(api, body, bad_fields):
    response = api.post("/api/orders/", body, format="json")

    assert response.status_code == 400
    assert sorted(response.json()) == sorted(bad_fields)
    assert counts() == (0, 0, 0)


def test_item_errors_name_the_item_field(api):
    body = {"customer_id": "c-1", "items": [ORDER["items"][0], {"sku": "A", "quantity": 1, "unit_price": "1.999"}]}
    errors = api.post("/api/orders/", body, format="json").json()
    assert list(errors["items"]) == ["1"]
    assert list(errors["items"]["1"]) == ["unit_price"]


@pytest.mark.parametrize("raw", ['{"customer_id": "c-1", "items": [', "[1, 2]", '"text"', "null"])
def test_malformed_or_non_object_json_is_400(api, raw):
    response = api.generic("POST", "/api/orders/", raw, content_type="application/json")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert isinstance(response.json(), dict)
    assert counts() == (0, 0, 0)


HOSTILE_BODIES = {
    "nested 5,000 deep": b'{"customer_id": "c-1", "items": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "nested 40 deep (over the limit of 32)": b'{"customer_id": "c-1", "items": ' + b"[" * 40 + b"]" * 40 + b"}",
    "a 5,000-digit number": b'{"customer_id": "c-1", "items": [{"sku": "A", "quantity": ' + b"9" * 5000 + b', "unit_price": "1"}]}',
    "invalid UTF-8": b'{"customer_id": "c-\xff\xfe", "items": []}',
    "NaN": b'{"customer_id": "c-1", "items": [{"sku": "A", "quantity": NaN, "unit_price": "1"}]}',
    "a lone surrogate escape": b'{"customer_id": "\\ud800", "items": []}',
}


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_hostile_bodies_are_400_with_a_json_body_naming_the_problem_and_write_nothing(api, name):
    response = api.generic("POST", "/api/orders/", HOSTILE_BODIES[name], content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"] if "detail" in response.json() else response.json()
    assert counts() == (0, 0, 0)


def test_a_body_over_the_size_limit_is_413_unread(api, settings):
    body = b'{"customer_id": "' + b"x" * (3 * 1024 * 1024) + b'", "items": []}'
    response = api.generic("POST", "/api/orders/", body, content_type="application/json")
    assert response.status_code == 413
    assert str(settings.API_MAX_BODY_BYTES) in response.json()["detail"]
    assert counts() == (0, 0, 0)


def test_retrieve_and_list_by_customer_paginated(api):
    ids = [api.post("/api/orders/", {**ORDER, "customer_id": c}, format="json").json()["id"] for c in ["c-1", "c-2", "c-1"]]

    assert api.get(f"/api/orders/{ids[1]}/").json()["customer_id"] == "c-2"
    listing = api.get("/api/orders/", {"customer_id": "c-1"}).json()
    assert listing["count"] == 2
    assert [o["id"] for o in listing["results"]] == [ids[2], ids[0]]
    assert {"next", "previous"} <= set(listing)


def test_cancel_once_emits_one_event_and_twice_is_409(api):
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]

    response = api.post(f"/api/orders/{order_id}/cancel/")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = api.post(f"/api/orders/{order_id}/cancel/")
    assert again.status_code == 409
    assert list(OutboxEvent.objects.order_by("id").values_list("event_type", flat=True)) == ["OrderCreated", "OrderCancelled"]
    cancelled = OutboxEvent.objects.get(event_type="OrderCancelled").payload
    assert cancelled == {"order_id": str(order_id), "customer_id": "c-1", "total": "20.03"}


def test_cancel_unknown_order_is_404_and_writes_nothing(api):
    assert api.post("/api/orders/999999/cancel/").status_code == 404
    assert api.get("/api/orders/999999/").status_code == 404
    assert counts() == (0, 0, 0)


def test_orders_of_another_user_are_invisible(api, django_user_model):
    order_id = api.post("/api/orders/", ORDER, format="json").json()["id"]
    other = APIClient()
    other.force_authenticate(django_user_model.objects.create_user(username="mallory"))

    assert other.get(f"/api/orders/{order_id}/").status_code == 404
    assert other.post(f"/api/orders/{order_id}/cancel/").status_code == 404
    assert other.get("/api/orders/").json()["count"] == 0
    assert Order.objects.get().status == "created"
    assert OutboxEvent.objects.count() == 1


class TestIdempotencyKey:
    def test_replay_returns_first_response_and_creates_nothing(self, api):
        first = api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        again = api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")

        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert counts() == (1, 2, 1)

    def test_same_key_different_body_is_422(self, api):
        api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        response = api.post("/api/orders/", {**ORDER, "customer_id": "c-2"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        assert response.status_code == 422
        assert counts() == (1, 2, 1)

    def test_key_in_flight_is_409(self, api, user):
        IdempotencyKey.objects.create(owner=user, key="k-1", request_hash=services.request_fingerprint(json.loads(json.dumps(ORDER))))
        response = api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        assert response.status_code == 409
        assert counts() == (0, 0, 0)

    def test_key_abandoned_by_a_dead_request_is_taken_over(self, api, user, settings):
        settings.IDEMPOTENCY_KEY_STALE_AFTER = 0
        IdempotencyKey.objects.create(owner=user, key="k-1", request_hash=services.request_fingerprint(ORDER))
        response = api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        assert response.status_code == 201
        assert counts() == (1, 2, 1)

    def test_failed_request_frees_its_key(self, api, monkeypatch):
        monkeypatch.setattr(services, "outbox_enqueue", lambda **kw: (_ for _ in ()).throw(RuntimeError("down")))
        with pytest.raises(RuntimeError):
            api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        monkeypatch.undo()
        assert api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1").status_code == 201
        assert counts() == (1, 2, 1)

    def test_keys_are_per_user(self, api, django_user_model):
        api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
        other = APIClient()
        other.force_authenticate(django_user_model.objects.create_user(username="bob"))
        assert other.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1").status_code == 201
        assert Order.objects.count() == 2


def test_total_is_computed_by_the_server():
    items = [services.ItemInput(sku="A", quantity=3, unit_price=Decimal("0.10")),
             services.ItemInput(sku="B", quantity=1_000_000, unit_price=Decimal("99999999.99"))]
    assert services.order_total(items=items) == Decimal("99999999990000.30")


@pytest.mark.django_db(transaction=True)
def test_a_request_whose_key_was_taken_over_rolls_back_and_frees_nothing_of_the_retry(api, user, monkeypatch):
    """The first request ran past IDEMPOTENCY_KEY_STALE_AFTER and a retry took its key: the first must not commit."""
    import threading

    from django.db import connection

    real_create = services.order_create

    def retry_takes_the_key_over():  # on its own connection, committed, as a concurrent request would
        IdempotencyKey.objects.filter(owner=user, key="k-1").update(created_at=timezone.now())
        connection.close()

    def slow_create(**kwargs):
        order = real_create(**kwargs)
        takeover = threading.Thread(target=retry_takes_the_key_over)
        takeover.start()
        takeover.join()
        return order

    monkeypatch.setattr(services, "order_create", slow_create)
    response = api.post("/api/orders/", ORDER, format="json", HTTP_IDEMPOTENCY_KEY="k-1")

    assert response.status_code == 409
    assert counts() == (0, 0, 0)
    assert IdempotencyKey.objects.filter(key="k-1").exists()  # the retry's claim is left alone
