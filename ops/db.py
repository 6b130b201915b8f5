"""Database helpers shared by the apps."""

from datetime import datetime

from django.db import connection
from django.db.models import QuerySet


def db_datetime(value: datetime):
    """A datetime as a raw cursor's parameter (naive UTC on MySQL), as the ORM would send it."""
    return connection.ops.adapt_datetimefield_value(value)


def delete_in_batches(queryset: QuerySet, *, batch_size: int) -> int:
    """Delete what queryset selects, batch_size rows per DELETE, each committed on its own (autocommit), so
    a large purge never holds locks for long. Returns the number of rows deleted."""
    total = 0
    while ids := list(queryset.values_list("pk", flat=True)[:batch_size]):
        total += queryset.model.objects.filter(pk__in=ids).delete()[0]
    return total
