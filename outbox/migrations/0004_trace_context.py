from django.db import migrations, models


class Migration(migrations.Migration):
    """Two columns with a constant database default: MariaDB 10.3+ and MySQL 8.0.12+ add them instantly,
    without rebuilding the table or blocking its writes, and a writer that does not name them (an older
    release during a rolling deploy, a tool) still inserts."""

    dependencies = [
        ('outbox', '0003_claim_index_with_available_at'),
    ]

    operations = [
        migrations.AddField(
            model_name='outboxevent',
            name='trace_parent',
            field=models.CharField(blank=True, db_default='', default='', max_length=55),
        ),
        migrations.AddField(
            model_name='outboxevent',
            name='trace_state',
            field=models.CharField(blank=True, db_default='', default='', max_length=512),
        ),
    ]
