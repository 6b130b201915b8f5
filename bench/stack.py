"""The real processes for the HTTP benchmarks: gunicorn, a Celery worker and beat, each a subprocess."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

from bench.common import ROOT

VENV_BIN = os.path.dirname(sys.executable)


def process_env(**overrides) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost"}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Stack:
    """Starts the named processes; stop() terminates them all."""

    def __init__(self, *, port: int, wsgi: str = "project.wsgi", web_workers: int = 4, relay: bool = True,
                 consumer: bool = False, **env):
        self.port = port
        self.env = process_env(**env)
        self.processes: list[subprocess.Popen] = []
        self.log = open(ROOT / ".run" / "bench-stack.log", "ab")
        self._start([f"{VENV_BIN}/gunicorn", wsgi, "--bind", f"127.0.0.1:{port}", "--workers", str(web_workers),
                     "--log-level", "warning"])
        if relay:
            self._start([f"{VENV_BIN}/celery", "-A", "project", "worker", "--loglevel", "WARNING",
                         "--without-mingle", "--without-gossip", "--concurrency", "2"])
            self._start([f"{VENV_BIN}/celery", "-A", "project", "beat", "--loglevel", "WARNING",
                         "--schedule", str(ROOT / ".run" / "bench-beat-schedule")])
        if consumer:
            self._start([f"{VENV_BIN}/python", "manage.py", "consume_events"])
            self.consumer = self.processes[-1]  # its exit code tells whether SIGTERM stopped it cleanly
        self._wait_for_web()

    def _start(self, command: list[str]) -> None:
        self.processes.append(subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log,
                                               start_new_session=True))

    def _wait_for_web(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/orders/", timeout=1)
            except urllib.error.HTTPError:
                time.sleep(2)  # answering (401): give the worker a moment to connect too
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("gunicorn did not start; see .run/bench-stack.log")

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.log.close()
