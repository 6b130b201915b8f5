from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from outbox.models import FailedEvent
from outbox.services import RequeueRefused, failed_event_requeue


class Command(BaseCommand):
    help = "Put failed events back into the outbox (same event id and key), as the admin's Requeue action does."

    def add_arguments(self, parser):
        parser.add_argument("event_ids", nargs="*", help="event UUIDs to requeue")
        parser.add_argument("--aggregate-id", help="requeue every failed event of this order")
        parser.add_argument("--all", action="store_true", help="requeue every failed event")
        parser.add_argument("--user", required=True, help="the operator's username, recorded as requeued_by")

    def handle(self, *args, event_ids=(), aggregate_id=None, all=False, user=None, **options):
        operator = get_user_model().objects.filter(username=user).first()
        if operator is None:
            raise CommandError(f"no user {user!r}")
        if not (event_ids or aggregate_id or all):
            raise CommandError("name event ids, --aggregate-id or --all")
        failed = FailedEvent.objects.all()
        if event_ids:
            failed = failed.filter(event_id__in=event_ids)
        if aggregate_id:
            failed = failed.filter(aggregate_id=aggregate_id)
        try:
            count = failed_event_requeue(failed_events=failed, user=operator)
        except RequeueRefused as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"requeued {count} event(s)")
