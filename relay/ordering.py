"""Per-order order: which claimed rows may be published now, and which wait for an earlier row of their order."""

from collections import defaultdict
from datetime import datetime, timezone as dt_timezone

from django.db import connection

from outbox.models import OutboxEvent

from .claim import CLAIM_INDEX, TABLE, Claimed


def split_by_aggregate_order(
    rows: list[Claimed], *, other_lanes: list[Claimed], now: datetime, one_per_aggregate: bool = False
) -> tuple[list[Claimed], list[Claimed]]:
    """Keep per-aggregate order: a row may go only if every earlier pending row of its aggregate goes with it.

    Rows of one aggregate in one batch share a key, hence a partition, and the idempotent producer keeps
    their order: a later one is never acknowledged unless the earlier ones were written, except past an
    earlier one refused for good, which is dead-lettered (then later events proceed, by design).

    An earlier row can be in another lane's batch, in backoff, locked by another relay, or just not
    claimed. Rows held behind a row in backoff are moved to its retry time, so claims stop picking them up
    until then.

    one_per_aggregate: only the first row of each aggregate goes; the others wait for the next batch. For
    when the broker is failing: a message that times out leaves a gap after which later messages of its
    partition are still written, so a later event must not be in flight beside an earlier one.
    """
    # Earliest pending row of each claimed aggregate that this batch did not claim (usually none), with
    # the time it is due: from the few pending rows before this batch's last one that no lane holds, read in
    # one index walk; asked by aggregate only when there are many (an outage's rows in backoff). The other
    # lanes' batches are known here.
    earlier = _earlier_pending_rows(rows, other_lanes)
    first_blocker = _first_blockers_in_table(rows) if earlier is None else _first_blockers_among(rows, earlier)
    for row in other_lanes:
        key = (row.aggregate_type, row.aggregate_id)
        known = first_blocker.get(key)
        if known is None or row.id < known[0]:
            first_blocker[key] = (row.id, now)  # due now: that lane is publishing it

    blocked_until: dict[int, datetime | None] = {}
    for row in rows:
        blocker = first_blocker.get((row.aggregate_type, row.aggregate_id))
        if blocker is not None and blocker[0] < row.id:
            blocked_until[row.id] = blocker[1] if blocker[1] > now else None

    if one_per_aggregate:
        first_of_aggregate: set[tuple[str, str]] = set()
        for row in rows:
            key = (row.aggregate_type, row.aggregate_id)
            if row.id not in blocked_until and key in first_of_aggregate:
                blocked_until[row.id] = None  # claimable again once this batch commits
            first_of_aggregate.add(key)
    ready = [row for row in rows if row.id not in blocked_until]
    held = [row for row in rows if row.id in blocked_until]
    by_time: dict[datetime, list[int]] = defaultdict(list)
    for row_id, until in blocked_until.items():
        if until is not None:
            by_time[until].append(row_id)
    for until, ids in by_time.items():
        OutboxEvent.objects.filter(id__in=ids).update(available_at=until)
    return ready, held


# More pending rows than this before a batch's last row (rows in backoff, say) are not read one by one: the
# table is asked for the first of each of the batch's orders instead.
EARLIER_ROWS_READ = 1000


def _earlier_pending_rows(rows: list[Claimed], other_lanes: list[Claimed]) -> list[tuple] | None:
    """(id, aggregate type, aggregate id, available_at as text in UTC) of the pending rows before the batch's
    last row that neither it nor another lane holds (usually none: rows held back, in backoff, or locked by
    another relay, whose whole batch it is then), in id order; None when there are more than
    EARLIER_ROWS_READ. The walk is the claim index's: the ids are checked inside it, and only the rows found
    are read."""
    known = ",".join(str(row.id) for row in (*rows, *other_lanes))
    with connection.cursor() as cursor:
        cursor.execute(
            # available_at as text: a datetime is built only for the few rows of this batch's orders (the
            # cursor's conversion of each row found cost ~2 us of the relay's CPU).
            f"SELECT id, aggregate_type, aggregate_id, CAST(available_at AS CHAR) FROM {TABLE} "
            f"FORCE INDEX ({CLAIM_INDEX}) "
            f"WHERE status = 'pending' AND id < %s AND id NOT IN ({known}) ORDER BY id LIMIT %s",
            [rows[-1].id, EARLIER_ROWS_READ + 1],
        )
        found = cursor.fetchall()
    return None if len(found) > EARLIER_ROWS_READ else found


def _first_blockers_among(rows: list[Claimed], earlier: list[tuple]) -> dict[tuple[str, str], tuple[int, datetime]]:
    claimed = {(row.aggregate_type, row.aggregate_id) for row in rows}
    first_blocker: dict[tuple[str, str], tuple[int, datetime]] = {}
    for row_id, aggregate_type, aggregate_id, available_at in earlier:  # in id order: the first one stays
        key = (aggregate_type, aggregate_id)
        if key in claimed and key not in first_blocker:
            first_blocker[key] = (row_id, datetime.fromisoformat(available_at).replace(tzinfo=dt_timezone.utc))
    return first_blocker


def _first_blockers_in_table(rows: list[Claimed]) -> dict[tuple[str, str], tuple[int, datetime]]:
    claimed_ids = {row.id for row in rows}
    max_id = max(claimed_ids)
    ids_by_type: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        ids_by_type[row.aggregate_type].add(row.aggregate_id)
    first_blocker: dict[tuple[str, str], tuple[int, datetime]] = {}
    claimed_list = ",".join(str(i) for i in claimed_ids)
    with connection.cursor() as cursor:
        for aggregate_type, aggregate_ids in ids_by_type.items():
            placeholders = ",".join(["%s"] * len(aggregate_ids))
            cursor.execute(
                f"SELECT aggregate_id, MIN(id) FROM {TABLE} "
                f"WHERE aggregate_type = %s AND aggregate_id IN ({placeholders}) AND id < %s "
                f"AND status = 'pending' AND id NOT IN ({claimed_list}) GROUP BY aggregate_id",
                [aggregate_type, *aggregate_ids, max_id],
            )
            blockers = cursor.fetchall()
            if blockers:
                available = dict(
                    OutboxEvent.objects.filter(id__in=[b[1] for b in blockers]).values_list("id", "available_at")
                )
                for aggregate_id, blocker_id in blockers:
                    first_blocker[(aggregate_type, aggregate_id)] = (blocker_id, available[blocker_id])
    return first_blocker
