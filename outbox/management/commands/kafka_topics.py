from confluent_kafka.admin import AdminClient, NewTopic
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ops.kafka_log import client_logger


def project_topics() -> list[str]:
    return [
        settings.OUTBOX_TOPIC_PREFIX + "order",
        settings.OUTBOX_DLQ_TOPIC,
        settings.INBOX_DLQ_TOPIC,
    ]


class Command(BaseCommand):
    help = "List or create the project's Kafka topics. Optional: producers work with auto-created topics too."

    def add_arguments(self, parser):
        parser.add_argument("--create", action="store_true", help="create the topics that do not exist")
        parser.add_argument("--partitions", type=int, default=6)
        parser.add_argument("--replication-factor", type=int, default=-1, help="-1: the broker's default")

    def handle(self, *args, create=False, partitions=6, replication_factor=-1, **options):
        admin = AdminClient({"bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS, "logger": client_logger(),
                             **settings.KAFKA_CONFIG})
        existing = admin.list_topics(timeout=10).topics
        for topic in project_topics():
            if topic in existing:
                self.stdout.write(f"{topic}: {len(existing[topic].partitions)} partitions")
            elif not create:
                self.stdout.write(f"{topic}: missing")
            else:
                future = admin.create_topics([NewTopic(topic, partitions, replication_factor)])[topic]
                try:
                    future.result(timeout=15)
                except Exception as exc:
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise CommandError(f"could not create {topic}: {exc}")
                self.stdout.write(f"{topic}: created with {partitions} partitions")
