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


def run_chaos(*args: str, timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the run configures its own processes
    process = subprocess.Popen(
        [sys.executable, "-m", "chaos.run", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # the run then kills its processes and makes sure MariaDB is up
            try:
                output, _ = process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            pytest.fail(f"the chaos run did not finish in {timeout} s:\n{output[-8000:]}")
    finally:
        _forget_database_connections()

    tail = output[-10000:]
    assert process.returncode == 0, f"chaos run failed (exit {process.returncode}):\n{tail}"
    result = re.search(r"^CHAOS RESULT: (\w+) lost=(\d+) ", output, re.MULTILINE)
    assert result is not None, f"no summary line in the output:\n{tail}"
    assert result.group(1) == "PASS" and result.group(2) == "0", tail
    return output


@pytest.mark.restarts_servers
def test_chaos_quick_run_loses_nothing_and_keeps_the_projection_exact():
    run_chaos("--quick", timeout=TIMEOUT)


@pytest.mark.restarts_servers  # not a restart, but a whole stack under load: it runs alone too
def test_chaos_on_a_misbehaving_cluster_with_default_relay_settings_dead_letters_nothing():
    """The real worker, beat, consumer and gunicorn against a three-broker mock cluster: leaders moved every 3 s,
    retriable produce errors, fatal idempotence errors, a broker down and back, consumer-group errors, a worker
    SIGKILL and every broker down for three minutes. The report's must-be-zero figures include dead-lettered
    rows and failed events; the relay runs with its default settings."""
    output = run_chaos("--cluster", "--quick", "--outage", "180", timeout=TIMEOUT + 420)
    rebuilt = re.search(r"producer rebuilt (\d+) time\(s\), after (\d+) fatal error", output)
    assert rebuilt is not None and int(rebuilt.group(2)) > 0, "no fatal producer error was provoked: " + output[-3000:]
    moves = re.search(r"cluster: (\d+) leader moves", output)
    assert moves is not None and int(moves.group(1)) > 10
