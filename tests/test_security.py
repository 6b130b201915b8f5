"""Security checks: authentication on every endpoint, ownership, the admin, and safe settings defaults.

(The requeue permission in the admin is covered by tests/outbox/test_admin.py.)
"""

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orders import services
from orders.models import Order, OrderItem
from outbox.models import OutboxEvent

BASE_DIR = Path(settings.BASE_DIR)
ORDER = {"customer_id": "c-1", "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"}]}

# Every endpoint of the API, as (method, path); {id} is an existing order of the user "alice".
ENDPOINTS = [
    ("post", "/api/orders/"),
    ("get", "/api/orders/"),
    ("get", "/api/orders/?customer_id=c-1"),
    ("get", "/api/orders/{id}/"),
    ("post", "/api/orders/{id}/cancel/"),
    ("get", "/api/customers/c-1/stats/"),
    ("get", "/api/schema/"),
]


def counts() -> tuple[int, int, int]:
    return Order.objects.count(), OrderItem.objects.count(), OutboxEvent.objects.count()


def token_client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def order(user) -> Order:
    return services.order_create(
        owner=user, customer_id="c-1", items=[services.ItemInput(sku="A-1", quantity=2, unit_price=Decimal("9.99"))]
    )


def call(client: APIClient, method: str, path: str, order: Order):
    url = path.format(id=order.pk)
    if method == "post":
        return client.post(url, ORDER if url == "/api/orders/" else None, format="json")
    return client.get(url)


# --- authentication ---------------------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_anonymous_requests_are_401_and_write_nothing(order, method, path):
    before = counts()

    response = call(APIClient(), method, path, order)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert counts() == before
    assert Order.objects.get().status == "created"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "authorization",
    [
        "Token not-a-real-token",
        "Token " + "0" * 40,
        "Token ",
        "Token two words",
        "token " + "0" * 40,
        "Bearer " + "0" * 40,
        "Basic YWxpY2U6cHc=",  # alice:pw — basic auth is not enabled
    ],
)
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_bad_credentials_are_401(order, authorization, method, path):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=authorization)
    before = counts()

    response = call(client, method, path, order)

    assert response.status_code == 401
    assert counts() == before


@pytest.mark.django_db
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_token_of_an_inactive_user_is_401(user, order, method, path):
    client = token_client(user)
    user.is_active = False
    user.save()

    assert call(client, method, path, order).status_code == 401


@pytest.mark.django_db
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_a_valid_token_is_accepted(user, order, method, path):
    response = call(token_client(user), method, path, order)
    assert response.status_code in {200, 201}, response.content


# --- ownership --------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_another_users_token_cannot_read_or_cancel_an_order(user, order, django_user_model):
    mallory = token_client(django_user_model.objects.create_user(username="mallory", password="pw"))
    before = counts()

    read = mallory.get(f"/api/orders/{order.pk}/")
    cancel = mallory.post(f"/api/orders/{order.pk}/cancel/")
    listing = mallory.get("/api/orders/", {"customer_id": "c-1"})

    assert read.status_code == 404
    assert cancel.status_code == 404
    # The same answer as for an order that does not exist: nothing tells that the id is taken.
    missing = mallory.get("/api/orders/999999999/")
    assert missing.status_code == 404
    assert set(read.json()) == set(missing.json()) == {"detail"}
    assert listing.json()["count"] == 0
    assert counts() == before  # no OrderCancelled event
    assert list(OutboxEvent.objects.values_list("event_type", flat=True)) == ["OrderCreated"]
    order.refresh_from_db()
    assert order.status == "created"

    # The owner still can.
    owner = token_client(user)
    assert owner.get(f"/api/orders/{order.pk}/").status_code == 200
    assert owner.post(f"/api/orders/{order.pk}/cancel/").status_code == 200
    assert OutboxEvent.objects.filter(event_type="OrderCancelled").count() == 1


@pytest.mark.django_db
def test_the_owner_cannot_be_chosen_by_the_client(user, django_user_model):
    mallory = django_user_model.objects.create_user(username="mallory")
    response = token_client(user).post("/api/orders/", {**ORDER, "owner": mallory.pk, "owner_id": mallory.pk}, format="json")

    assert response.status_code == 201
    assert Order.objects.get().owner == user
    assert token_client(mallory).get(f"/api/orders/{response.json()['id']}/").status_code == 404


# --- the admin --------------------------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/admin/", "/admin/orders/order/", "/admin/outbox/outboxevent/"])
def test_admin_requires_staff(client, user, django_user_model, path):
    assert client.get(path).status_code == 302  # anonymous

    client.force_login(user)  # logged in, not staff
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")

    client.force_login(django_user_model.objects.create_superuser(username="root", password="pw"))
    assert client.get(path).status_code == 200


@pytest.mark.django_db
def test_admin_login_refuses_a_non_staff_user(client, user):
    response = client.post("/admin/login/", {"username": "alice", "password": "pw", "next": "/admin/"})

    assert response.status_code == 200  # the form again, with an error
    assert b"staff account" in response.content
    assert client.get("/admin/").status_code == 302


# --- settings ---------------------------------------------------------------------------------------------

PRINT_DEBUG = (
    "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'project.settings'; django.setup(); "
    "from django.conf import settings; print(settings.DEBUG)"
)


def run_settings(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SECRET_KEY", "DJANGO_DEBUG", "DJANGO_SETTINGS_MODULE"}}
    return subprocess.run(
        [sys.executable, "-c", PRINT_DEBUG], env={**clean, **env}, cwd=BASE_DIR, capture_output=True, text=True,
        timeout=60,
    )


def test_without_a_secret_key_and_without_debug_the_app_refuses_to_start():
    result = run_settings()

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_debug_is_off_by_default():
    result = run_settings(DJANGO_SECRET_KEY="s3cret-for-this-test")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off"])
def test_debug_stays_off_for_falsy_values(value):
    result = run_settings(DJANGO_SECRET_KEY="s3cret-for-this-test", DJANGO_DEBUG=value)
    assert result.stdout.strip() == "False", result.stderr


def test_an_empty_secret_key_is_refused_too():
    result = run_settings(DJANGO_SECRET_KEY="")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_only_make_run_turns_debug_on():
    assert run_settings(DJANGO_DEBUG="1").stdout.strip() == "True"  # what make run does: no secret needed
    assert 'DJANGO_DEBUG="${DJANGO_DEBUG:-1}"' in (BASE_DIR / "scripts" / "run-dev").read_text()
    for name in ["Procfile", "Dockerfile", "docker-compose.yml", "scripts/test", "Makefile"]:
        text = (BASE_DIR / name).read_text()
        assert "DJANGO_DEBUG=1" not in text.replace(" ", "").replace('"', "").replace(":", "="), name
