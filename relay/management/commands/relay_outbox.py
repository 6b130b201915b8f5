from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ops.runtime import collect_garbage_for_batches
from ops.tracing import tracing_setup
from relay.services import relay_run


class Command(BaseCommand):
    help = "Publish pending outbox events now, in this process (the Celery task does the same on schedule)."

    def add_arguments(self, parser):
        parser.add_argument("--until-empty", action="store_true", help="keep going until nothing is due")

    def handle(self, *args, until_empty=False, **options):
        if not settings.OUTBOX_RELAY_ENABLED:
            # One publisher at a time: relay_cdc publishes the same rows, with its own position.
            raise CommandError("OUTBOX_RELAY_ENABLED=0: the Celery relay is off (relay_cdc publishes); "
                               "set OUTBOX_RELAY_ENABLED=1 to publish with the relay")
        tracing_setup(process="relay")
        collect_garbage_for_batches()
        total = 0
        while True:
            result = relay_run()
            total += result.sent
            if not until_empty or result.claimed == 0 or (result.sent == 0 and result.held == 0):
                break
        self.stdout.write(f"published {total} event(s)")
