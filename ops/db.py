"""Database helpers shared by the apps."""

from django.db.models import QuerySet


def delete_in_batches(queryset: QuerySet, *, batch_size: int) -> int:
    """Delete what queryset selects, batch_size rows per DELETE, each committed on its own (autocommit), so
    a large purge never holds locks for long. Returns the number of rows deleted."""
    total = 0
    while ids := list(queryset.values_list("pk", flat=True)[:batch_size]):
        total += queryset.model.objects.filter(pk__in=ids).delete()[0]
    return total
