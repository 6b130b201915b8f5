import os

from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client import REGISTRY

from .collectors import DatabaseStateCollector
from .services import readiness_checks


def healthz(request):
    """The process answers: nothing else is checked (a liveness probe must not fail when a dependency does)."""
    return JsonResponse({"status": "ok"})


def readyz(request):
    checks = readiness_checks()
    ready = all(check["ok"] for check in checks.values())
    return JsonResponse({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)


def metrics(request):
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY  # this process only
    body = generate_latest(registry) + generate_latest(_database_registry())
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


_db_registry = None


def _database_registry() -> CollectorRegistry:
    global _db_registry
    if _db_registry is None:
        _db_registry = CollectorRegistry()
        _db_registry.register(DatabaseStateCollector())
    return _db_registry
