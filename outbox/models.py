import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


NOT_PUBLISHED = -1


class OutboxEvent(models.Model):
    """One domain event, written in the same transaction as the change it describes.

    The auto-increment id is the publication order: events of one aggregate are written under
    that aggregate's row lock, so their ids follow their commit order.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        DEAD = "dead"  # exhausted: see FailedEvent

    id = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    aggregate_type = models.CharField(max_length=64)
    aggregate_id = models.CharField(max_length=64)
    event_type = models.CharField(max_length=64)
    payload = models.JSONField()
    occurred_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    available_at = models.DateTimeField(default=timezone.now, help_text="Not published before this time (backoff).")
    last_error = models.TextField(blank=True, default="")
    # When the current run of retriable failures began (NULL while none): an outage keeps an event retrying,
    # and it is given up only once it has been failing for OUTBOX_GIVE_UP_AFTER (README "Retries").
    failing_since = models.DateTimeField(null=True, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)
    # Where the broker wrote the event; NOT_PUBLISHED until it acknowledged it. Not NULL on purpose: marking
    # a row sent then rewrites fixed-size values in place, where NULL -> value grows every row of a batch
    # (measured: about 7% of drain throughput, see docs/benchmarks.md).
    kafka_partition = models.IntegerField(default=NOT_PUBLISHED)
    kafka_offset = models.BigIntegerField(default=NOT_PUBLISHED)
    # W3C Trace Context of the request that enqueued the event (empty with tracing off): one relay batch carries
    # many requests' events, so it is captured at enqueue, never read at publish time.
    trace_parent = models.CharField(max_length=55, blank=True, default="", db_default="")
    trace_state = models.CharField(max_length=512, blank=True, default="", db_default="")

    class Meta:
        indexes = [
            # The claim: WHERE status='pending' AND available_at <= now ORDER BY id, walked in index order;
            # available_at in the index lets the claim pass over rows in backoff without reading them
            # (during an outage: 15 ms instead of 125 ms per claim over 120,000 rows in backoff).
            models.Index(fields=["status", "id", "available_at"], name="outbox_claim_idx"),
            # The per-aggregate ordering check and "events of this order" look-ups.
            models.Index(fields=["aggregate_type", "aggregate_id", "id"], name="outbox_aggregate_idx"),
            # Retention purge of old sent rows.
            models.Index(fields=["status", "published_at"], name="outbox_purge_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=["pending", "sent", "dead"]), name="outbox_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.aggregate_type}:{self.aggregate_id} ({self.status})"

    @property
    def kafka_position(self) -> str | None:
        if self.kafka_offset in (NOT_PUBLISHED, None):  # None: a row written by code from before -1
            return None
        return f"partition {self.kafka_partition}, offset {self.kafka_offset}"


class FailedEvent(models.Model):
    """An event the relay gave up on. Never deleted automatically: an operator inspects and requeues."""

    class Status(models.TextChoices):
        DEAD_LETTERED = "dead_lettered", "in DLQ topic"
        DLQ_PENDING = "dlq_pending", "DLQ publish pending"
        FAILED = "failed", "DLQ publish failed"
        REQUEUED = "requeued"

    # A ForeignKey, not one-to-one: a requeued event that fails again gets a second record.
    outbox_event = models.ForeignKey(OutboxEvent, on_delete=models.PROTECT, related_name="failures")
    event_id = models.UUIDField(db_index=True)
    aggregate_type = models.CharField(max_length=64)
    aggregate_id = models.CharField(max_length=64, db_index=True)
    event_type = models.CharField(max_length=64)
    topic = models.CharField(max_length=255)
    payload = models.JSONField()
    headers = models.JSONField()
    error = models.TextField()
    attempts = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices)
    dlq_attempts = models.PositiveIntegerField(default=0)
    dlq_error = models.TextField(blank=True, default="")
    dlq_next_attempt_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(default=timezone.now)
    requeued_at = models.DateTimeField(null=True, blank=True)
    requeued_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        permissions = [("requeue_failedevent", "Can requeue failed events")]
        indexes = [models.Index(fields=["status", "dlq_next_attempt_at"], name="failed_dlq_retry_idx")]

    def __str__(self) -> str:
        return f"{self.event_type} {self.aggregate_type}:{self.aggregate_id} ({self.status})"
