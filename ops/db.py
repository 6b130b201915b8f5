"""Database helpers shared by the apps."""

from collections.abc import Callable
from datetime import datetime

from django.db import IntegrityError, OperationalError, connection
from django.db.models import QuerySet

# InnoDB rolled the transaction back as a deadlock victim (1213), or it waited too long for a row lock (1205):
# nobody's fault, the same transaction may simply run again.
LOCK_CONFLICT_CODES = frozenset({1205, 1213})


def lock_conflict(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and bool(exc.args) and exc.args[0] in LOCK_CONFLICT_CODES


# A unique key already holds the value (MySQL and MariaDB: ER_DUP_ENTRY).
DUPLICATE_KEY_CODE = 1062


def duplicate_key(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError) and bool(exc.args) and exc.args[0] == DUPLICATE_KEY_CODE


def db_datetime(value: datetime):
    """A datetime as a raw cursor's parameter (naive UTC on MySQL), as the ORM would send it."""
    return connection.ops.adapt_datetimefield_value(value)


def sql_literals() -> Callable[[object], str]:
    """A function that writes a value as an SQL literal, escaped by the driver exactly as it escapes a query's
    parameters (bound to this thread's connection: get one per batch).

    For the statements that carry hundreds of values per batch: passing each as a parameter costs more CPU than
    the database's work, so a batch's constants are escaped once and its numbers written as such. Strings and
    datetimes go through this; never format text into SQL any other way.
    """
    connection.ensure_connection()
    literal = connection.connection.literal
    return lambda value: literal(value).decode()


def delete_in_batches(queryset: QuerySet, *, batch_size: int) -> int:
    """Delete what queryset selects, batch_size rows per DELETE, each committed on its own (autocommit), so
    a large purge never holds locks for long. Returns the number of rows deleted."""
    total = 0
    while ids := list(queryset.values_list("pk", flat=True)[:batch_size]):
        total += queryset.model.objects.filter(pk__in=ids).delete()[0]
    return total
