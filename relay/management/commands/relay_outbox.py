from django.core.management.base import BaseCommand

from ops.runtime import collect_garbage_for_batches
from ops.tracing import tracing_setup
from relay.services import relay_run


class Command(BaseCommand):
    help = "Publish pending outbox events now, in this process (the Celery task does the same on schedule)."

    def add_arguments(self, parser):
        parser.add_argument("--until-empty", action="store_true", help="keep going until nothing is due")

    def handle(self, *args, until_empty=False, **options):
        tracing_setup(process="relay")
        collect_garbage_for_batches()
        total = 0
        while True:
            result = relay_run()
            total += result.sent
            if not until_empty or result.claimed == 0 or (result.sent == 0 and result.held == 0):
                break
        self.stdout.write(f"published {total} event(s)")
