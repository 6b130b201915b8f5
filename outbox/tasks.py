from celery import shared_task

from .services import outbox_purge_sent


@shared_task(ignore_result=True)
def purge_sent_events() -> None:
    outbox_purge_sent()
