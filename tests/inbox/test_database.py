"""Which database errors the consumer waits out."""

from django.db import InterfaceError, OperationalError

from inbox.database import database_unavailable


def test_only_transient_errors_count_as_the_database_being_down():
    assert database_unavailable(OperationalError(2006, "MySQL server has gone away"))
    assert database_unavailable(OperationalError(2013, "Lost connection to server during query"))
    assert database_unavailable(OperationalError(1290, "The MariaDB server is running with the --read-only option"))
    assert database_unavailable(OperationalError(1836, "Running in read-only mode"))
    assert database_unavailable(OperationalError(1040, "Too many connections"))
    assert database_unavailable(OperationalError(1205, "Lock wait timeout exceeded"))
    assert database_unavailable(InterfaceError(0, ""))
    assert not database_unavailable(OperationalError(1366, "Incorrect decimal value"))
    assert not database_unavailable(ValueError("not a database error"))
