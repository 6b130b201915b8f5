from django.db import migrations, models

TABLE = "outbox_outboxevent"


class Migration(migrations.Migration):
    """The claim index gains available_at, under the same name and in one ALTER TABLE: the relay forces
    this index by name, so it must exist at every moment, and MySQL/MariaDB build it online."""

    dependencies = [
        ("outbox", "0002_kafka_position_not_null"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f"ALTER TABLE {TABLE} DROP INDEX outbox_claim_idx, "
                    f"ADD INDEX outbox_claim_idx (status, id, available_at)",
                    reverse_sql=f"ALTER TABLE {TABLE} DROP INDEX outbox_claim_idx, ADD INDEX outbox_claim_idx (status, id)",
                ),
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="outboxevent", name="outbox_claim_idx"),
                migrations.AddIndex(
                    model_name="outboxevent",
                    index=models.Index(fields=["status", "id", "available_at"], name="outbox_claim_idx"),
                ),
            ],
        ),
    ]
