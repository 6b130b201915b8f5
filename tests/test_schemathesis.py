"""Fuzz every API operation from its own OpenAPI schema (schemathesis), in-process, against the real database.

For every generated request, sent with a real user's token:
- never a 5xx;
- every 4xx is a JSON object (`Content-Type: application/json`);
- a rejected request (status >= 400) leaves orders, order items and outbox events untouched;
- a 2xx matches the documented response schema, and a 201 wrote exactly the order it answers with;
- valid requests succeed: every valid order without a reused Idempotency-Key answers 201 and writes one order,
  its items and one OrderCreated event; every operation answers 2xx to some of its positive cases.
"""

from decimal import Decimal
from urllib.parse import unquote

import pytest
import schemathesis
from django.urls import Resolver404, resolve
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from orders import services
from orders.models import Order, OrderItem
from outbox.models import OutboxEvent
from project.wsgi import application

pytestmark = pytest.mark.django_db(transaction=True)

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
OPERATIONS = {
    ("POST", "/api/orders/"): [POSITIVE, NEGATIVE],
    ("GET", "/api/orders/"): [POSITIVE, NEGATIVE],
    ("GET", "/api/orders/{order_id}/"): [POSITIVE],
    ("POST", "/api/orders/{order_id}/cancel/"): [POSITIVE],
    ("GET", "/api/customers/{customer_id}/stats/"): [POSITIVE],
}
# Negative data for path parameters builds URLs that match no route at all (Django's own 404 page),
# so path operations are fuzzed with schema-conforming data only; their bodies and queries are free.

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the working tree
    # No shrinking: each step is a request, and shrinking a failure took minutes. The failing case is
    # reported as generated, with a curl line to reproduce it.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# Bodies the schema allows are mostly refused (blank-after-trim strings, "-1.5" prices...), so about half
# of the POSTs are replaced by orders within the contract's limits, from the whole of Unicode and the full
# numeric range. Half of their strings come from a small alphabet of awkward characters: whitespace, control,
# zero-width, format and combining characters (some collations weigh them as nothing), astral ones.
AWKWARD = " \t\x01\x1f\x7f\u00a0\u00ad\u0301\u0600\u200b\u200d\u2028\ufeff\ufe0f\uffff" + "aé🧾𠀀"
texts = st.one_of(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=64),
    st.text(st.sampled_from(AWKWARD), min_size=1, max_size=8),
)


def _acceptable_text(value: str) -> bool:
    # DRF trims whitespace (str.strip) before checking that a string is not blank, and refuses NUL characters.
    return bool(value.strip()) and "\x00" not in value


def orders(text: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "customer_id": text,
        "items": st.lists(st.fixed_dictionaries({
            "sku": text,
            "quantity": st.integers(1, 1_000_000),
            "unit_price": st.decimals(0, "99999999.99", places=2).map(str),
        }), min_size=1, max_size=20),
    })


valid_orders = orders(texts)
# Orders the README's validation rules accept: the API must answer each with 201.
accepted_orders = orders(texts.filter(_acceptable_text))


def counts() -> tuple[int, int, int]:
    return Order.objects.count(), OrderItem.objects.count(), OutboxEvent.objects.count()


@pytest.fixture
def auth(user) -> dict[str, str]:
    return {"Authorization": f"Token {Token.objects.create(user=user).key}"}


@pytest.fixture
def schema(auth):
    # Loaded through the real endpoint, with the token (the schema is not public).
    return schemathesis.openapi.from_wsgi("/api/schema/", application, headers=auth)


@pytest.fixture
def seeded(user, django_user_model) -> dict[str, list]:
    """Real orders to aim at: some of the caller's (cancellable once), some of another user's (invisible)."""
    item = [services.ItemInput(sku="A-1", quantity=2, unit_price=Decimal("9.99"))]
    mine = [services.order_create(owner=user, customer_id=f"c-{n}", items=item).pk for n in range(4)]
    other = django_user_model.objects.create_user(username="mallory")
    theirs = [services.order_create(owner=other, customer_id="c-0", items=item).pk for _ in range(2)]
    return {"order_ids": mine + theirs, "customer_ids": ["c-0", "c-1", "c-2", "c-3"]}


def test_schema_documents_every_operation(schema):
    documented = {(op.method.upper(), op.path) for op in (result.ok() for result in schema.get_all_operations())}
    assert documented == set(OPERATIONS)


def _check(case, response, before: tuple[int, int, int]) -> None:
    status = response.status_code
    assert status < 500, f"{case.method} {case.formatted_path} -> {status}: {response.text[:500]}"
    case.validate_response(response, checks=[not_a_server_error])
    content_type = response.headers.get("content-type", [""])[0]
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, response.text[:500])
        assert isinstance(response.json(), dict), response.text[:500]
        assert counts() == before, f"rejected request ({status}) changed the database: {response.text[:500]}"
    else:
        assert content_type.startswith("application/json"), (status, content_type)
        case.validate_response(response, checks=[response_schema_conformance, status_code_conformance])
        after = counts()
        if case.method == "GET":
            assert after == before
        elif status == 201:  # an order: its items and one event, or an idempotent replay of one
            delta = tuple(a - b for a, b in zip(after, before))
            replayed = "Idempotency-Key" in (case.headers or {}) and delta == (0, 0, 0)
            assert replayed or delta == (1, len(case.body["items"]), 1), delta
            _check_order_written(response.json(), created=not replayed)
        else:  # a cancel: one event
            assert after == (before[0], before[1], before[2] + 1)


def _check_order_written(answer: dict, *, created: bool) -> None:
    """The order in the database is the one the 201 describes, with its one OrderCreated event."""
    order = Order.objects.get(pk=answer["id"])
    assert (order.customer_id, str(order.total), order.status) == (answer["customer_id"], answer["total"], "created")
    stored_items = [(i.sku, i.quantity, str(i.unit_price)) for i in order.items.order_by("id")]
    assert stored_items == [(i["sku"], i["quantity"], i["unit_price"]) for i in answer["items"]]
    events = OutboxEvent.objects.filter(aggregate_type="order", aggregate_id=str(order.pk))
    assert [e.event_type for e in events] == ["OrderCreated"] or not created
    created_event = events.get(event_type="OrderCreated")
    assert created_event.payload["total"] == answer["total"]
    assert created_event.payload["customer_id"] == answer["customer_id"]


@pytest.mark.parametrize(
    "method, path, mode",
    [(method, path, mode) for (method, path), modes in OPERATIONS.items() for mode in modes],
    ids=lambda v: str(v),
)
def test_fuzzed_requests(schema, auth, seeded, method, path, mode):
    operation = schema[path][method]
    seen: set[int] = set()
    valid_creates: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), aim=st.data())
    def run(case, aim):
        # Aim about half of the id-addressed requests at real orders (ours and another user's).
        if "order_id" in (case.path_parameters or {}) and aim.draw(st.booleans(), label="real order"):
            case.path_parameters["order_id"] = aim.draw(st.sampled_from(seeded["order_ids"]), label="order_id")
        if "customer_id" in (case.path_parameters or {}) and aim.draw(st.booleans(), label="real customer"):
            case.path_parameters["customer_id"] = aim.draw(st.sampled_from(seeded["customer_ids"]))
        valid_create = False
        if (method, path) == ("POST", "/api/orders/"):
            body = aim.draw(st.sampled_from(["generated", "near the contract", "accepted"]), label="body kind")
            if body == "accepted":  # a plain create (no key that could replay an earlier answer): must be a 201
                case.body = aim.draw(accepted_orders, label="body")
                case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "idempotency-key"}
                valid_create = True
            else:
                if body == "near the contract":
                    case.body = aim.draw(valid_orders, label="body")
                if aim.draw(st.booleans(), label="reused key"):  # replays (same body) and 422s (another body)
                    case.headers = {**(case.headers or {}),
                                    "Idempotency-Key": aim.draw(st.sampled_from(["k-1", "k-2"]))}
        try:
            resolve(unquote(case.formatted_path))
        except Resolver404:  # pragma: no cover - the schema's parameter constraints keep URLs routable
            pytest.fail(f"generated a URL outside the API: {case.formatted_path}")

        before = counts()
        response = case.call(headers=auth)
        seen.add(response.status_code)
        _check(case, response, before)
        if valid_create:
            assert response.status_code == 201, f"a valid order was refused ({response.status_code}): {response.text[:500]}"
            valid_creates.append(response.status_code)

    run()
    print(f"{method} {path} [{mode}]: statuses {sorted(seen)}, valid creates {len(valid_creates)}")
    if mode == POSITIVE:
        assert any(200 <= status < 300 for status in seen), f"no generated request succeeded: {sorted(seen)}"


@FUZZ
@given(body=accepted_orders)
def test_every_order_within_the_contract_is_created_with_its_one_event(auth, body):
    """Valid requests succeed: 40 generated orders within the README's rules, each answered 201 with exactly the
    order, its items and one OrderCreated event written (the fuzzing above cannot pass on refusals alone)."""
    from django.test import Client

    before = counts()
    response = Client().post("/api/orders/", body, content_type="application/json",
                             HTTP_AUTHORIZATION=auth["Authorization"])

    assert response.status_code == 201, response.content[:500]
    after = counts()
    assert tuple(a - b for a, b in zip(after, before)) == (1, len(body["items"]), 1)
    _check_order_written(response.json(), created=True)
