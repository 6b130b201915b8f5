"""The identity of a consumer dead letter."""

import pytest

from inbox.dead_letters import dead_letter_find, dead_letter_record
from inbox.messages import RawMessage

pytestmark = pytest.mark.django_db


def test_a_dead_letter_at_an_offset_that_had_one_before_is_a_new_dead_letter():
    """A topic deleted and created again starts its offsets at 0 again: the identity of a dead letter is its
    offset and its bytes."""
    first = RawMessage("t", 0, 7, b"1", b"[1]", [("id", b"a")])
    later = RawMessage("t", 0, 7, b"1", b"[2]", [("id", b"b")])
    one = dead_letter_record(group_id="g", raw=first, error="poison", attempts=1, dlq_topic="d")
    again = dead_letter_record(group_id="g", raw=first, error="poison", attempts=1, dlq_topic="d")
    other = dead_letter_record(group_id="g", raw=later, error="poison", attempts=1, dlq_topic="d")

    assert one.pk == again.pk != other.pk
    assert (other.value, other.event_id) == ("[2]", "b")
    assert dead_letter_find(group_id="g", raw=later).pk == other.pk
