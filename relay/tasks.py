from celery import shared_task
from django.conf import settings

from . import services


@shared_task(ignore_result=True)
def relay_outbox(woken: bool = False) -> None:
    """Beat's poll (a plain run) or the on-commit wake-up (a run that follows commits while they come)."""
    if not settings.OUTBOX_RELAY_ENABLED:
        return
    if woken:
        services.relay_follow()
    else:
        services.relay_run()


@shared_task(ignore_result=True)
def retry_dead_letters() -> None:
    """Beat's DLQ sweeper. With the Celery relay off, relay_cdc runs the sweeper in its own process."""
    if not settings.OUTBOX_RELAY_ENABLED:
        return
    services.dead_letters_retry()
