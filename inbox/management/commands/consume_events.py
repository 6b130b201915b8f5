from django.core.management.base import BaseCommand

from inbox.consumer import consumer_from_settings, tune_process_for_consuming
from ops.tracing import tracing_setup


class Command(BaseCommand):
    help = "Consume order events and apply each once (group, topics and DLQ from the INBOX_* settings)."

    def add_arguments(self, parser):
        parser.add_argument("--max-messages", type=int, help="stop after this many messages")
        parser.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a message")

    def handle(self, *args, max_messages=None, idle_timeout=None, **options):
        tracing_setup(process="consumer")
        consumer = consumer_from_settings()
        consumer.install_signal_handlers()
        tune_process_for_consuming()
        self.stdout.write(f"consuming {consumer.topics} as group {consumer.group_id}")
        stats = consumer.run(max_messages=max_messages, idle_timeout=idle_timeout)
        self.stdout.write(f"stopped: {stats}")
