from celery import shared_task
from django.conf import settings

from . import services


@shared_task(ignore_result=True)
def relay_outbox() -> None:
    if not settings.OUTBOX_RELAY_ENABLED:
        return
    services.relay_wake_clear()
    services.relay_run()


@shared_task(ignore_result=True)
def retry_dead_letters() -> None:
    services.dead_letters_retry()
