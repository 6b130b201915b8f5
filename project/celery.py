import os

from celery import Celery
from celery.signals import beat_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# In each prefork child (a span exporter's thread does not survive a fork) and in beat; off unless OTEL_* ask.
@worker_process_init.connect(weak=False)
def _tracing_in_worker(**_kwargs):
    from ops.tracing import tracing_setup

    tracing_setup(process="worker", celery=True)


@worker_process_init.connect(weak=False)
def _collect_garbage_for_batches(**_kwargs):
    from ops.runtime import collect_garbage_for_batches

    collect_garbage_for_batches()  # a relay drain spent a fifth of its own CPU in the collector


@beat_init.connect(weak=False)
def _tracing_in_beat(**_kwargs):
    from ops.tracing import tracing_setup

    tracing_setup(process="beat", celery=True)
