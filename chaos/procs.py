"""The processes of a chaos run: each a subprocess in its own process group, plus MariaDB control."""

import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from tests.kafka_tools import TANSU, Broker, _port_open, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent
if not (VENV_BIN / "gunicorn").exists():
    VENV_BIN = ROOT / ".venv" / "bin"

PIDS_FILE = ROOT / ".run" / "chaos" / "pids.json"
LOCK_FILE = ROOT / ".run" / "chaos" / "lock"


def _load_pids() -> list[dict]:
    try:
        return json.loads(PIDS_FILE.read_text())
    except (OSError, ValueError):
        return []


def _save_pids(entries: list[dict]) -> None:
    PIDS_FILE.parent.mkdir(parents=True, exist_ok=True)
    if entries:
        PIDS_FILE.write_text(json.dumps(entries))
    else:
        PIDS_FILE.unlink(missing_ok=True)


def _record_pid(pid: int, argv: list[str]) -> None:
    """Remember every process group this run started, so a run killed with SIGKILL can be cleaned up next time."""
    _save_pids(_load_pids() + [{"runner": os.getpid(), "pid": pid, "cmdline": "\0".join(argv)}])


def _cmdline(pid: int) -> str | None:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        return None


def _runner_alive(pid: int) -> bool:
    return pid != os.getpid() and "chaos.run" in (_cmdline(pid) or "")


class AnotherRun(Exception):
    pass


def acquire_run_lock(*, timeout: float, on_wait=None):
    """One chaos run at a time on this machine: they share the database orders_chaos and Redis db 13.

    Waits up to timeout seconds for a run in progress to end. The lock dies with the process holding it
    (even on SIGKILL), and the processes a run starts do not inherit it. Keep the returned file open.
    """
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    handle = open(LOCK_FILE, "a+")
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise AnotherRun(f"another chaos run still holds {LOCK_FILE} after {timeout:.0f} s") from None
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(1)


def kill_leftovers() -> list[int]:
    """Kill the process groups an earlier run started and left behind (its runner was killed with SIGKILL).

    Call it holding the run lock. Only groups whose leader is still the very command that run started
    (same pid, same command line) are touched.
    """
    killed = []
    for entry in _load_pids():
        if _runner_alive(entry["runner"]):
            continue
        if _cmdline(entry["pid"]) == entry["cmdline"]:
            try:
                os.killpg(entry["pid"], signal.SIGKILL)
                killed.append(entry["pid"])
            except (ProcessLookupError, PermissionError):
                pass
    _save_pids([e for e in _load_pids() if _runner_alive(e["runner"])])
    return killed


def forget_own_pids() -> None:
    _save_pids([e for e in _load_pids() if e["runner"] != os.getpid()])


class Proc:
    """One long-running command in its own process group (so a SIGKILL takes its children with it)."""

    def __init__(self, name: str, argv: list[str], *, env: dict, log_dir: pathlib.Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1} at {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
        log.flush()
        self.popen = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _record_pid(self.popen.pid, self.argv)
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or the OOM killer would."""
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kills += 1

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it."""
        if self.popen is None:
            return
        self.signal_group(signal.SIGCONT)  # a stopped group could not handle SIGTERM
        self.signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # the leader's children too, even when the leader is gone
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


class ChaosBroker(Broker):
    """tests.kafka_tools.Broker, with the Tansu process in its own process group like the other processes."""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        _record_pid(self.process.pid, argv)
        wait_for(lambda: _port_open(self.port), timeout=30, message=f"broker on port {self.port}")
        if self.topics:
            self.create_topics(*self.topics)

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        super().stop()


# ---------------------------------------------------------------------------------------------- MariaDB

MARIADBD = "/usr/sbin/mariadbd"


# The shared server is known by its pid file (and reached by its default socket), never by its executable's
# name: another mariadbd on the machine (the CDC tests' binlog server, another project's) is not it. Looking for
# "any mariadbd" waited for a stop that had happened, and made start-stop-daemon start nothing.
def shared_pid_file() -> pathlib.Path:
    """The pid file the server's configuration names (my_print_defaults reads what mariadbd reads)."""
    try:
        options = subprocess.run(["my_print_defaults", "--mysqld"], capture_output=True, text=True,
                                 timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        options = []
    named = [option.split("=", 1)[1] for option in options if option.startswith("--pid-file=")]
    return pathlib.Path(named[-1] if named else "/run/mysqld/mysqld.pid")


def mariadb_ping(timeout: float = 10) -> bool:
    try:
        return subprocess.run(["mariadb-admin", "-uroot", "--connect-timeout=2", "ping"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def mariadbd_running() -> bool:
    """Whether the shared server's process (the pid in its pid file) is alive."""
    try:
        pid = int(shared_pid_file().read_text().strip())
        return pathlib.Path(f"/proc/{pid}/exe").resolve() == pathlib.Path(MARIADBD)
    except (OSError, ValueError):
        return False


def mariadb_stop(timeout: float = 120) -> None:
    subprocess.run(["mariadb-admin", "-uroot", "shutdown"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=timeout)
    wait_for(lambda: not mariadbd_running(), timeout=timeout, interval=0.2, message="mariadbd to exit")


def mariadb_start(timeout: float = 120) -> None:
    # --pidfile: "already running" means this server's pid is alive, not that some mariadbd is.
    subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--pidfile", str(shared_pid_file()),
                    "--exec", MARIADBD],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   start_new_session=True, check=True, timeout=30)
    wait_for(mariadb_ping, timeout=timeout, interval=0.3, message="mariadb-admin ping")


def mariadb_ensure_running() -> bool:
    """Start MariaDB if it does not answer. Returns True when it had to be started."""
    if mariadb_ping():
        return False
    if mariadbd_running():  # starting up or shutting down: give it time
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if mariadb_ping():
                return False
            if not mariadbd_running():
                break
            time.sleep(0.5)
    mariadb_start()
    return True
