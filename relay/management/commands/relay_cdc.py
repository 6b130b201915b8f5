import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from ops.runtime import collect_garbage_for_batches
from relay.cdc import ConnectorConfigError, connector_properties, relay_cdc_run


class Command(BaseCommand):
    help = ("The CDC relay: Debezium's embedded engine reads the outbox from the binlog and this process publishes "
            "each event as the Celery relay would (README 'The CDC relay'). Run it instead of the relay, not beside it.")

    def handle(self, *args, **options):
        try:
            properties = connector_properties()
        except ConnectorConfigError as exc:
            raise CommandError(str(exc)) from exc
        collect_garbage_for_batches()
        should_stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: should_stop.set())
        try:
            relay_cdc_run(properties=properties, should_stop=should_stop)
        except (ConnectorConfigError, RuntimeError) as exc:
            raise CommandError(str(exc)) from exc
