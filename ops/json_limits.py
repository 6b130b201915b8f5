"""Limits for JSON read from outside (HTTP bodies, Kafka values): numbers of bounded length.

The standard library turns a digit string of any length into an int (up to Python's own 4,300-digit limit, which
raises a bare ValueError deep inside the parse); callers pass these as json.loads' parse_int / parse_float.
"""


def bounded_number(convert, max_digits: int):
    """A parse_int/parse_float for json.loads that refuses (ValueError) a number longer than max_digits."""

    def parse(text: str):
        if len(text) > max_digits:
            raise ValueError(f"a number has more than {max_digits} digits")
        return convert(text)

    return parse
