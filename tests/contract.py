"""docs/asyncapi.yaml as a test oracle: a message read off the broker must match its message's header and payload
schemas. Pipeline tests call assert_matches_contract on what they read, so a payload or header change that the
contract does not describe fails them."""

import json
from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
BASE = "urn:orders:asyncapi"


@cache
def contract() -> dict:
    return yaml.safe_load(CONTRACT.read_text())


@cache
def _registry() -> Registry:
    return Registry().with_resource(BASE, Resource.from_contents(contract(), default_specification=DRAFT7))


def validator(pointer: str) -> Draft7Validator:
    """A validator for the schema at a JSON pointer of the contract, e.g. /components/messages/OrderCreated/payload."""
    return Draft7Validator({"$ref": f"{BASE}#{pointer}"}, registry=_registry())


def _check(pointer: str, instance, what: str) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in validator(pointer).iter_errors(instance)]
    assert not errors, f"{what} does not match docs/asyncapi.yaml {pointer}: {errors}"


def assert_matches_contract(record, *, message: str | None = None) -> None:
    """record: a tests.kafka_tools.Record (headers decoded to text). message: the contract's message name; by
    default the record's event type (an order event)."""
    name = message or record.headers["eventType"]
    spec, base = contract()["components"]["messages"][name], f"/components/messages/{name}"
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    _check(f"{base}/headers", record.headers, f"the headers of {where}")
    # A consumer dead letter's value is the original message's, JSON or not: the contract says nothing of it.
    if name != "ConsumerDeadLetter" and not record.headers.get("dlq.valueOmitted"):
        _check(f"{base}/payload", json.loads(record.value), f"the value of {where}")
    if "key" in spec.get("bindings", {}).get("kafka", {}):
        _check(f"{base}/bindings/kafka/key", record.key, f"the key of {where}")
