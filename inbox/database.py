"""The consumer and its database: a database that is away or busy is not the message's fault.

Such errors are waited out, never dead-lettered, never a crash: the connection lost or refused, the server
read-only during a failover (1290, 1836), too many connections (1040), a lock wait timeout (1205: someone else
holds the rows), and the driver's InterfaceError (no connection). Any other error is the message's: it is
retried, then dead-lettered (a deadlock, 1213, runs the batch again first: inbox.writer).
"""

import logging
import time
from collections.abc import Callable

from django.db import DatabaseError, InterfaceError, close_old_connections, connection

logger = logging.getLogger(__name__)

TRANSIENT_ERROR_CODES = {1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031, 1290, 1836, 1040, 1205}


def database_unavailable(exc: BaseException) -> bool:
    """A transient database error (TRANSIENT_ERROR_CODES, or the driver's InterfaceError: no connection)."""
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, DatabaseError) and bool(exc.args) and exc.args[0] in TRANSIENT_ERROR_CODES


def until_database_answers(work: Callable, *, stopping: Callable[[], bool]):
    """work(), run again on a fresh connection (backing off up to 10 s) while the database is unavailable;
    an error that is not transient, or any error once stopping() holds, is raised."""
    delay = 0.5
    while True:
        try:
            return work()
        except DatabaseError as exc:
            if not database_unavailable(exc) or stopping():
                close_old_connections()
                raise
            logger.warning("database unavailable, retrying in %.1fs: %s", delay, exc)
            connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
