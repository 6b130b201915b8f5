"""docs/asyncapi.yaml is a valid AsyncAPI 3.0 document, and what the pipeline publishes matches it."""

import copy
import json
import subprocess
from pathlib import Path

import pytest

from outbox.models import OutboxEvent
from relay.services import relay_run
from tests.contract import CONTRACT, assert_matches_contract, contract, validator
from tests.kafka_tools import high_watermarks, read_topic

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / "scripts" / "asyncapi" / "validate.mjs"
TOPIC = "outbox.event.order"
ORDER = {"customer_id": "c-contract", "items": [{"sku": "A-1", "quantity": 2, "unit_price": "9.99"},
                                                {"sku": "B-2", "quantity": 1, "unit_price": "0.50"}]}


def validate(path: Path) -> subprocess.CompletedProcess:
    """The AsyncAPI parser (scripts/asyncapi, installed by `make test`), as the AsyncAPI CLI runs it."""
    return subprocess.run(["node", str(VALIDATOR), str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_contract_is_a_valid_asyncapi_3_document():
    done = validate(CONTRACT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid AsyncAPI 3.0.0" in done.stdout


def test_the_validator_refuses_a_broken_document(tmp_path):
    broken = copy.deepcopy(contract())
    broken["operations"]["publishOrderEvents"]["channel"]["$ref"] = "#/channels/noSuchChannel"
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(broken))
    done = validate(path)
    assert done.returncode == 1 and "INVALID" in done.stdout, done.stdout + done.stderr


def test_the_contract_names_the_topics_the_settings_use(settings):
    addresses = {channel["address"] for channel in contract()["channels"].values()}
    assert addresses == {settings.OUTBOX_TOPIC_PREFIX + "order", settings.OUTBOX_DLQ_TOPIC, settings.INBOX_DLQ_TOPIC}


@pytest.mark.django_db(transaction=True)
def test_the_events_an_order_publishes_match_the_contract(broker, api):
    start = high_watermarks(broker.bootstrap, TOPIC)
    order_id = str(api.post("/api/orders/", ORDER, format="json").json()["id"])
    api.post(f"/api/orders/{order_id}/cancel/")
    assert relay_run(budget=5).sent == 2

    records = read_topic(broker.bootstrap, TOPIC, start=start, keys={order_id}, until=lambda rs: len(rs) >= 2)

    assert [r.headers["eventType"] for r in records] == ["OrderCreated", "OrderCancelled"]
    for record in records:
        assert_matches_contract(record)


@pytest.mark.django_db(transaction=True)
def test_a_payload_the_contract_does_not_describe_fails_it(broker, api):
    """Adding a field to an event (or dropping one) without changing docs/asyncapi.yaml fails the pipeline tests."""
    api.post("/api/orders/", ORDER, format="json")
    payload = OutboxEvent.objects.get().payload
    schema = validator("/components/messages/OrderCreated/payload")
    assert schema.is_valid(payload)
    assert not schema.is_valid({**payload, "currency": "EUR"})
    assert not schema.is_valid({k: v for k, v in payload.items() if k != "total"})
    assert not schema.is_valid({**payload, "total": 19.98})  # a float, where the contract says a decimal string
