"""Test settings: the project's settings, with test-only defaults for what a deployment must provide."""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key")
# A suite running beside another one (see TEST_DATABASE_NAME below) needs its own Redis db too: the relay's
# wake flag and the test worker's queue live there. CELERY_BROKER_URL=redis://127.0.0.1:6379/12 make test
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

from project.settings import *  # noqa: E402,F403

OUTBOX_PUBLISH_TIMEOUT = 5.0
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testhandlers"]  # noqa: F405
# Lets two suites run side by side on one server (TEST_DATABASE_NAME=test_orders_2 make test).
DATABASES["default"]["TEST"]["NAME"] = os.environ.get("TEST_DATABASE_NAME", "test_orders")  # noqa: F405
