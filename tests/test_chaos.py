"""The DESIGN's reliability proof, in CI: `python -m chaos.run --quick` against the real processes.

The run has its own database (orders_chaos), Redis db (13) and broker, and starts and kills its own processes,
so this test uses none of the pytest-django database fixtures. It takes about 1.5 to 2.5 minutes and restarts
MariaDB once: `make test` (scripts/test) runs it after the rest of the suite, alone, under a machine-wide lock
that other `make test` runs of this project hold while their suite runs.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300


def _forget_database_connections() -> None:
    """The run restarted MariaDB: connections this test process holds from earlier tests are dead now.
    Drop them so that later tests connect afresh."""
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        try:
            connection.close()
        except Exception:
            connection.connection = None


@pytest.mark.restarts_servers
def test_chaos_quick_run_loses_nothing_and_keeps_the_projection_exact():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the run configures its own processes
    process = subprocess.Popen(
        [sys.executable, "-m", "chaos.run", "--quick"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # the run then kills its processes and makes sure MariaDB is up
            try:
                output, _ = process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            pytest.fail(f"the chaos run did not finish in {TIMEOUT} s:\n{output[-8000:]}")
    finally:
        _forget_database_connections()

    tail = output[-10000:]
    assert process.returncode == 0, f"chaos run failed (exit {process.returncode}):\n{tail}"
    result = re.search(r"^CHAOS RESULT: (\w+) lost=(\d+) ", output, re.MULTILINE)
    assert result is not None, f"no summary line in the output:\n{tail}"
    assert result.group(1) == "PASS" and result.group(2) == "0", tail
