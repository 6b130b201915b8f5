from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from inbox.models import ConsumerDeadLetter
from inbox.services import dead_letters_replay


class Command(BaseCommand):
    help = "Apply consumer dead letters through their handler again, as the admin's Replay action does."

    def add_arguments(self, parser):
        parser.add_argument("ids", nargs="*", type=int, help="dead-letter ids (the admin's)")
        parser.add_argument("--event-id", action="append", default=[], help="replay the dead letters of this event id")
        parser.add_argument("--all", action="store_true", help="replay every dead letter not applied by a replay yet")
        parser.add_argument("--user", required=True, help="the operator's username, recorded as replayed_by")

    def handle(self, *args, ids=(), event_id=(), all=False, user=None, **options):
        operator = get_user_model().objects.filter(username=user).first()
        if operator is None:
            raise CommandError(f"no user {user!r}")
        if not (ids or event_id or all):
            raise CommandError("name dead-letter ids, --event-id or --all")
        records = ConsumerDeadLetter.objects.all()
        if ids:
            records = records.filter(pk__in=ids)
        if event_id:
            records = records.filter(event_id__in=event_id)
        if all:
            records = records.exclude(replay_outcome__in=["applied", "already applied"])
        result = dead_letters_replay(dead_letters=records, user=operator)
        self.stdout.write(f"replayed: {result.applied} applied, {result.already_applied} already applied, "
                          f"{result.failed} failed")
