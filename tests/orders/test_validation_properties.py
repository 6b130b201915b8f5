"""Property tests (Hypothesis) for order validation and the server-computed total."""

import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from orders import services
from orders.models import Order, OrderItem
from orders.serializers import MAX_ORDER_TOTAL, OrderCreateSerializer
from outbox.models import OutboxEvent

MAX_PRICE = Decimal("99999999.99")
CHEAP = settings(max_examples=150, deadline=None, database=None)
DB = settings(
    max_examples=15, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

prices = st.decimals(min_value=0, max_value=MAX_PRICE, places=2)
quantities = st.integers(min_value=1, max_value=1_000_000)
# Any Unicode scalar value (astral planes and emoji included; no lone surrogates), except NUL, which
# DRF refuses; whitespace at the ends is trimmed by DRF, so round-trip values are strip-stable.
any_char = st.characters(codec="utf-8", exclude_characters="\x00")
# Characters every collation weighs (letters, digits, CJK, emoji): a value holding one is never "empty".
significant_char = st.sampled_from("aZ9-é日本ß\u0416\u05d0🧾😀🏳️\U0001f9ea\U00020000\U0010fffd".replace("\ufe0f", ""))


def text_values(max_size: int = 64):
    return (
        st.tuples(st.text(any_char, max_size=max_size - 1), significant_char, st.text(any_char, max_size=max_size - 1))
        .map(lambda t: (t[0] + t[1] + t[2]))
        .filter(lambda s: len(s) <= max_size and s == s.strip())
    )


items = st.lists(
    st.fixed_dictionaries({"sku": text_values(), "quantity": quantities, "unit_price": prices}),
    min_size=1, max_size=50,
)


def as_json(order_items: list[dict]) -> list[dict]:
    return [{**i, "unit_price": str(i["unit_price"])} for i in order_items]


def counts() -> tuple[int, int, int]:
    return Order.objects.count(), OrderItem.objects.count(), OutboxEvent.objects.count()


# --- the total -------------------------------------------------------------------------------------------

@CHEAP
@given(items=st.lists(st.tuples(quantities, prices), min_size=1, max_size=50))
@example(items=[(1_000_000, MAX_PRICE)] * 50)
@example(items=[(1, Decimal("0.01"))] * 3)
def test_total_is_the_exact_decimal_sum(items):
    total = services.order_total(items=[services.ItemInput(sku="s", quantity=q, unit_price=p) for q, p in items])

    cents = sum(q * int(p * 100) for q, p in items)  # an independent oracle in integer cents
    assert total == Decimal(cents) / 100
    assert total == sum((q * p for q, p in items), Decimal(0))
    assert total.as_tuple().exponent == -2  # always rendered with 2 decimals
    assert str(total) == f"{cents // 100}.{cents % 100:02d}"


# --- the serializer accepts valid input as is -----------------------------------------------------------

@CHEAP
@given(customer_id=text_values(), order_items=items)
@example(customer_id="🧾" * 64, order_items=[{"sku": "😀" * 64, "quantity": 1_000_000, "unit_price": MAX_PRICE}])
@example(customer_id="\U0010fffd", order_items=[{"sku": "x", "quantity": 1, "unit_price": Decimal("0.00")}])
def test_valid_orders_are_accepted_unchanged(customer_id, order_items):
    serializer = OrderCreateSerializer(data={"customer_id": customer_id, "items": as_json(order_items)})

    assert serializer.is_valid(), serializer.errors
    assert serializer.validated_data["customer_id"] == customer_id
    assert [dict(i) for i in serializer.validated_data["items"]] == order_items


# --- the serializer rejects invalid input, naming the field -----------------------------------------------

def _bad_value(field: str):
    """Strategies of values that must be refused, per field."""
    return {
        "customer_id": st.one_of(
            st.text(any_char, min_size=65, max_size=100).filter(lambda s: len(s.strip()) > 64),
            text_values(30).map(lambda s: s + "\ud800"),
            text_values(30).map(lambda s: "\udfff" + s),
            st.just(""), st.text(" \t\n", min_size=1, max_size=5),
        ),
        "sku": st.one_of(
            st.text(any_char, min_size=65, max_size=100).filter(lambda s: len(s.strip()) > 64),
            text_values(30).map(lambda s: s[:1] + "\ud800" + s[1:]),
            st.just(""),
        ),
        "quantity": st.one_of(st.integers(max_value=0), st.integers(min_value=1_000_001)),
        "unit_price": st.one_of(
            # three decimals, the last one not zero
            st.decimals(min_value=0, max_value=MAX_PRICE, places=3).filter(lambda d: d.as_tuple().digits[-1] != 0)
            .map(str),
            st.decimals(max_value=Decimal("-0.01"), min_value=-MAX_PRICE, places=2).map(str),
            st.decimals(min_value=Decimal("100000000.00"), max_value=Decimal("1e12"), places=2).map(str),
            st.sampled_from(["1e400", "NaN", "Infinity", "abc", ""]),
        ),
    }[field]


@CHEAP
@given(
    customer_id=text_values(), order_items=items, field=st.sampled_from(["customer_id", "sku", "quantity", "unit_price"]),
    data=st.data(),
)
def test_invalid_values_are_rejected_naming_the_field(customer_id, order_items, field, data):
    bad = data.draw(_bad_value(field), label="bad value")
    index = data.draw(st.integers(0, len(order_items) - 1), label="index")
    body = {"customer_id": customer_id, "items": as_json(order_items)}
    if field == "customer_id":
        body["customer_id"] = bad
    else:
        body["items"][index][field] = bad

    serializer = OrderCreateSerializer(data=body)

    assert not serializer.is_valid()
    if field == "customer_id":
        assert set(serializer.errors) == {"customer_id"}
    else:
        assert set(serializer.errors) == {"items"}
        assert set(serializer.errors["items"]) == {index}
        assert set(serializer.errors["items"][index]) == {field}


@pytest.mark.parametrize(
    "item, field",
    [
        ({"sku": "a", "quantity": 1, "unit_price": "1.999"}, "unit_price"),
        ({"sku": "a", "quantity": 1, "unit_price": "0.001"}, "unit_price"),
        ({"sku": "a", "quantity": 0, "unit_price": "1.00"}, "quantity"),
        ({"sku": "a", "quantity": -1, "unit_price": "1.00"}, "quantity"),
        ({"sku": "a", "quantity": 1_000_001, "unit_price": "1.00"}, "quantity"),
        ({"sku": "x" * 65, "quantity": 1, "unit_price": "1.00"}, "sku"),
        ({"sku": "😀" * 65, "quantity": 1, "unit_price": "1.00"}, "sku"),
        ({"sku": "a", "quantity": 1, "unit_price": "100000000.00"}, "unit_price"),
    ],
)
def test_known_invalid_items_are_rejected_naming_the_field(item, field):
    ok = {"sku": "ok", "quantity": 1, "unit_price": "1.00"}
    serializer = OrderCreateSerializer(data={"customer_id": "c", "items": [ok, item]})
    assert not serializer.is_valid()
    assert serializer.errors["items"].keys() == {1}
    assert serializer.errors["items"][1].keys() == {field}


@pytest.mark.parametrize("value", ["\ud800", "a\udbff", "\udc00b", "ok\ud83d"])  # lone surrogates, high and low
def test_lone_surrogates_are_rejected(value):
    serializer = OrderCreateSerializer(
        data={"customer_id": value, "items": [{"sku": value, "quantity": 1, "unit_price": "1.00"}]}
    )
    assert not serializer.is_valid()
    assert set(serializer.errors) == {"customer_id", "items"}
    assert set(serializer.errors["items"][0]) == {"sku"}


def test_customer_id_of_65_astral_characters_is_rejected():
    serializer = OrderCreateSerializer(
        data={"customer_id": "🧾" * 65, "items": [{"sku": "a", "quantity": 1, "unit_price": "1.00"}]}
    )
    assert not serializer.is_valid()
    assert set(serializer.errors) == {"customer_id"}


@pytest.mark.parametrize("count, ok", [(100, True), (101, False), (500, False)])
def test_a_total_beyond_the_total_column_is_refused(count, ok):
    body = {"customer_id": "c", "items": [{"sku": "s", "quantity": 1_000_000, "unit_price": str(MAX_PRICE)}] * count}
    serializer = OrderCreateSerializer(data=body)
    assert serializer.is_valid() is ok
    if not ok:
        assert set(serializer.errors) == {"items"}
    assert MAX_ORDER_TOTAL == Decimal("9999999999999999.99")


# --- through the API and the database ---------------------------------------------------------------------

@pytest.mark.django_db
@DB
@given(customer_id=text_values(), order_items=items.map(lambda i: i[:5]))
@example(customer_id="🧾" * 64, order_items=[{"sku": "\U0001f9ea" * 64, "quantity": 1_000_000, "unit_price": MAX_PRICE}])
@example(customer_id="Ünï©ødé 日本 \U00020000", order_items=[{"sku": "é\u0301x", "quantity": 1, "unit_price": Decimal("0.05")}])
def test_unicode_round_trips_through_api_and_database(api, customer_id, order_items):
    response = api.post("/api/orders/", {"customer_id": customer_id, "items": as_json(order_items)}, format="json")
    assert response.status_code == 201, response.content
    order_id = response.json()["id"]

    expected_total = services.order_total(items=[services.ItemInput(**i) for i in order_items])
    for body in (response.json(), api.get(f"/api/orders/{order_id}/").json()):
        assert body["customer_id"] == customer_id
        assert [i["sku"] for i in body["items"]] == [i["sku"] for i in order_items]
        assert [Decimal(i["unit_price"]) for i in body["items"]] == [i["unit_price"] for i in order_items]
        assert body["total"] == str(expected_total)
    order = Order.objects.get(pk=order_id)
    assert order.customer_id == customer_id
    assert order.total == expected_total
    assert list(order.items.order_by("id").values_list("sku", flat=True)) == [i["sku"] for i in order_items]
    payload = OutboxEvent.objects.get(aggregate_id=str(order_id), event_type="OrderCreated").payload
    assert payload["customer_id"] == customer_id
    assert [i["sku"] for i in payload["items"]] == [i["sku"] for i in order_items]
    assert payload["total"] == str(expected_total)


# Strings a case- and accent-insensitive collation compares equal to '' or to each other. Ids are stored with
# a binary collation, so each is its own exact value.
UNUSUAL_TEXT = ["\x01", "\u200b", "\u0600", "\u0301", "\x01\u200b\u0301"]


@pytest.mark.django_db
@pytest.mark.parametrize("value", UNUSUAL_TEXT)
@pytest.mark.parametrize("field", ["customer_id", "sku"])
def test_unusual_but_valid_text_is_stored_exactly(api, value, field):
    body = {"customer_id": "c-1", "items": [{"sku": "A-1", "quantity": 1, "unit_price": "1.00"}]}
    if field == "customer_id":
        body["customer_id"] = value
    else:
        body["items"][0]["sku"] = value

    response = api.post("/api/orders/", body, format="json")

    assert response.status_code == 201, response.content
    stored = Order.objects.get()
    assert (stored.customer_id if field == "customer_id" else stored.items.get().sku) == value


@pytest.mark.django_db
def test_ids_and_keys_compare_exactly_not_by_case_or_accent(api):
    order = {"items": [{"sku": "A-1", "quantity": 1, "unit_price": "1.00"}]}
    assert api.post("/api/orders/", {**order, "customer_id": "c-1"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1").status_code == 201
    second = api.post("/api/orders/", {**order, "customer_id": "C-1"}, format="json", HTTP_IDEMPOTENCY_KEY="K-1")
    assert second.status_code == 201  # another key, not a replay (nor a 422)
    assert api.get("/api/orders/", {"customer_id": "C-1"}).json()["count"] == 1
    assert api.post("/api/orders/", {**order, "customer_id": "c\u0301-1"}, format="json").status_code == 201
    assert api.get("/api/orders/", {"customer_id": "c-1"}).json()["count"] == 1


@pytest.mark.django_db
def test_order_over_the_total_column_is_400_through_the_api(api):
    body = {"customer_id": "c", "items": [{"sku": "s", "quantity": 1_000_000, "unit_price": str(MAX_PRICE)}] * 500}
    response = api.post("/api/orders/", body, format="json")
    assert response.status_code == 400
    assert set(response.json()) == {"items"}
    assert counts() == (0, 0, 0)


@pytest.mark.django_db
@DB
@given(bad=st.one_of(
    st.text(any_char, min_size=65, max_size=80).filter(lambda s: len(s.strip()) > 64),
    text_values(20).map(lambda s: s + "\ud800"),
))
def test_invalid_customer_id_through_the_api_is_400_and_writes_nothing(api, bad):
    body = {"customer_id": bad, "items": [{"sku": "a", "quantity": 1, "unit_price": "1.00"}]}
    # json.dumps escapes lone surrogates as \udXXX, as a real client's encoder does.
    response = api.generic("POST", "/api/orders/", json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert set(response.json()) == {"customer_id"}
    assert counts() == (0, 0, 0)
