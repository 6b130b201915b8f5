"""Side-by-side measurement helpers: work run in k processes started together, and CPU read off /proc."""

import multiprocessing
import os
import queue
import time


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """The process and its descendants (a Celery worker and its pool children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in tree_pids(pid):
        try:
            total += cpu_seconds(member)
        except OSError:
            pass
    return total


def mariadb_pid() -> int:
    """The server the benchmarks' connection talks to (its pid file: a second mariadbd may run beside it)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT @@pid_file")
        path = cursor.fetchone()[0]
    with open(path) as pid_file:
        return int(pid_file.read().strip())


def _child(work, args, barrier, results) -> None:
    from django.db import connection

    connection.ensure_connection()  # connected before the start, as a deployed process is
    barrier.wait()
    results.put(work(*args))
    connection.close()


def in_processes(calls: list[tuple]) -> tuple[list, float, float]:
    """Each (function, args) of calls in a forked process of its own, each on its own database connection,
    released together once all are connected. Returns (their results, in no particular order; seconds from the
    release to the last result; MariaDB CPU seconds in between)."""
    from django.db import connections

    connections.close_all()  # a forked child must not share the parent's connection
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(len(calls) + 1), context.Queue()
    children = [context.Process(target=_child, args=(work, args, barrier, results)) for work, args in calls]
    for child in children:
        child.start()
    database = mariadb_pid()
    barrier.wait(timeout=60)
    started, cpu = time.perf_counter(), cpu_seconds(database)
    done = []
    while len(done) < len(children):
        try:
            done.append(results.get(timeout=1))
        except queue.Empty:
            if any(child.exitcode not in (None, 0) for child in children):
                raise RuntimeError("a benchmark process failed; see its traceback above") from None
    seconds, cpu = time.perf_counter() - started, cpu_seconds(database) - cpu
    for child in children:
        child.join(30)
        if child.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited {child.exitcode}")
    return done, seconds, cpu
