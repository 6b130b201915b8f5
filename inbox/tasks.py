from celery import shared_task

from .services import processed_events_purge


@shared_task(ignore_result=True)
def purge_processed_events() -> None:
    processed_events_purge()
