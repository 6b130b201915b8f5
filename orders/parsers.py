"""The API's only body parser: JSON with limits, so that no body, however hostile, costs more than a 4xx.

Limits (README "HTTP API"): API_MAX_BODY_BYTES (a larger body is 413 before it is parsed), MAX_DEPTH levels of
nesting, MAX_NUMBER_DIGITS digits in a number. Anything else wrong (not UTF-8, not JSON, NaN) is a 400.
"""

import json

from django.conf import settings
from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import JSONParser

from ops.json_limits import bounded_number

MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 100


class BodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "body_too_large"


def _refuse_constant(name: str):
    raise ParseError(f"JSON parse error - {name} is not a JSON value")


def nesting_depth(data) -> int:
    depth, level = 0, [(data, 1)]
    while level:
        value, at = level.pop()
        if isinstance(value, dict):
            depth = max(depth, at)
            level.extend((v, at + 1) for v in value.values())
        elif isinstance(value, list):
            depth = max(depth, at)
            level.extend((v, at + 1) for v in value)
    return depth


class LimitedJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.API_MAX_BODY_BYTES
        body = stream.read(limit + 1) if stream is not None else b""
        if len(body) > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
        try:
            data = json.loads(text, parse_int=bounded_number(int, MAX_NUMBER_DIGITS),
                              parse_float=bounded_number(float, MAX_NUMBER_DIGITS), parse_constant=_refuse_constant)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if nesting_depth(data) > MAX_DEPTH:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels")
        return data
