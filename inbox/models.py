from django.conf import settings
from django.db import models
from django.utils import timezone


class ProcessedEvent(models.Model):
    """An event id a consumer group has applied. The unique key is what makes redelivery harmless."""

    group_id = models.CharField(max_length=255)
    event_id = models.CharField(max_length=64)
    event_type = models.CharField(max_length=64)
    topic = models.CharField(max_length=255)
    partition = models.IntegerField()
    offset = models.BigIntegerField()
    processed_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["group_id", "event_id"], name="inbox_processed_once")]

    def __str__(self) -> str:
        return f"{self.group_id}: {self.event_type} {self.event_id}"


class ConsumerDeadLetter(models.Model):
    """A message the consumer could not apply. Kept here for operators, and sent to the consumer's DLQ topic."""

    group_id = models.CharField(max_length=255)
    topic = models.CharField(max_length=255)
    partition = models.IntegerField()
    offset = models.BigIntegerField()
    # SHA-256 of the message's key, value and headers: with the offset, its identity, which survives a topic
    # deleted and created again (offsets restart at 0; a new message there is a new dead letter).
    fingerprint = models.CharField(max_length=64, blank=True, default="")
    key = models.TextField(blank=True, default="")
    value = models.TextField(blank=True, default="")
    headers = models.JSONField(default=dict)
    event_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    error = models.TextField()
    attempts = models.PositiveIntegerField()
    dlq_topic = models.CharField(max_length=255)
    dlq_published = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    # A replay (admin action or `replay_dead_letters`): who, when, and what came of it.
    replayed_at = models.DateTimeField(null=True, blank=True)
    replayed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    replay_outcome = models.CharField(max_length=32, blank=True, default="")  # applied, already applied, failed

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["group_id", "topic", "partition", "offset", "fingerprint"],
                                    name="inbox_dead_letter_message_once")
        ]
        permissions = [("replay_consumerdeadletter", "Can replay consumer dead letters")]

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}: {self.error[:60]}"
