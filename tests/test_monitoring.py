"""The alert rules and the dashboard in deploy/: valid, unit-tested, and naming only metrics /metrics exposes."""

import json
import pathlib
import re
import shutil
import subprocess

import pytest
from django.test import Client

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "orders-outbox.json"
PROMQL_WORDS = {"sum", "max", "min", "avg", "by", "on", "and", "or", "unless", "rate", "increase", "irate",
                "histogram_quantile", "le", "without", "group_left", "group_right", "ignoring", "count", "bool"}


def promtool(*args) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package for it"
    return subprocess.run([path, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_alert_rules_are_valid():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_rules_fire_as_their_unit_tests_expect():
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"', "", expr)  # label matchers, ranges, strings
    expr = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", expr)  # label names of a grouping
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
    return {re.sub(r"_(bucket|count|sum)$", "", n) if n.endswith(("_bucket", "_count", "_sum")) else n for n in names}


def exposed(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")} | {
        line.split()[2] + "_total" for line in text.splitlines() if line.startswith("# TYPE ") and line.split()[3] == "counter"}


@pytest.mark.django_db
def test_every_metric_the_dashboard_and_the_alerts_name_is_exposed_by_metrics():
    text = Client().get("/metrics").content.decode()
    available = exposed(text)
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += re.findall(r"expr: >-\n((?:\s{10}.*\n)+)|expr: (.*)", (RULES / "alerts.yml").read_text())
    named = set()
    for expr in expressions:
        for part in (expr if isinstance(expr, tuple) else (expr,)):
            named |= metric_names(part)
    assert named, "no metric found in the queries"
    assert named <= available, f"named but not exposed: {sorted(named - available)}"
    assert {"outbox_oldest_pending_age_seconds", "inbox_consumer_lag", "inbox_seconds_since_last_applied"} <= named
