"""The environment of a subprocess a test starts (manage.py, celery): the suite's settings, its test database
and the given broker, plus what the test adds."""

import os

from django.conf import settings


def suite_env(broker, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"mysql://root@127.0.0.1:3306/{settings.DATABASES['default']['NAME']}",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        **extra,
    }
