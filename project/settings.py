"""Settings. Everything that differs between deployments comes from the environment, here and only here."""

import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, "1" if default else "0").strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_json(name: str) -> dict:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object of librdkafka settings")
    return value


DEBUG = env_bool("DJANGO_DEBUG")
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required unless DJANGO_DEBUG=1")
    SECRET_KEY = "insecure-dev-only-key"
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h]

# DJANGO_HTTPS=1: the site is served over HTTPS (usually TLS ends at a proxy that sets X-Forwarded-Proto).
# Plain HTTP is redirected, browsers are told to use HTTPS only, and cookies are sent over HTTPS only. Off by
# default: API clients and probes inside a cluster often speak plain HTTP, and a redirect would break them.
HTTPS = env_bool("DJANGO_HTTPS")
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # Probes and scrapers call these over plain HTTP from inside the network.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "orders",
    "outbox",
    "relay",
    "inbox",
    "stats",
    "ops",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "project.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "mysql://root@127.0.0.1:3306/orders"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
DATABASES["default"].setdefault("OPTIONS", {}).update(
    # READ COMMITTED: the relay's claim must see rows committed after its transaction began,
    # and SKIP LOCKED claims must not take gap locks.
    {"charset": "utf8mb4", "isolation_level": "read committed"}
)
DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50),
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON with limits on size, nesting and number length (orders.parsers): hostile bodies are a 400 or 413.
    "DEFAULT_PARSER_CLASSES": ["orders.parsers.LimitedJSONParser"],
    "EXCEPTION_HANDLER": "orders.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
# The largest request body the API parses (bytes); a larger one is answered 413 unread.
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES  # Django's own check, where a body is read whole
# An Idempotency-Key whose first request has not finished after this long is treated as abandoned
# (its process died) and may be taken over by a retry.
IDEMPOTENCY_KEY_STALE_AFTER = env_float("IDEMPOTENCY_KEY_STALE_AFTER", 30.0)

# Celery: the relay runs as tasks; Redis is only the task queue, never a store of events.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# At least two: a woken relay run follows commits for up to OUTBOX_RUN_BUDGET in one process, and beat's
# tasks must not wait behind it.
CELERY_WORKER_CONCURRENCY = env_int("CELERY_WORKER_CONCURRENCY", max(2, os.cpu_count() or 1))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Kafka. KAFKA_CONFIG is passed to producer and consumer as is (SASL, TLS, compression...);
# KAFKA_PRODUCER_CONFIG and KAFKA_CONSUMER_CONFIG to one side only. All are JSON objects.
KAFKA_BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
KAFKA_CONFIG = env_json("KAFKA_CONFIG")
KAFKA_PRODUCER_CONFIG = env_json("KAFKA_PRODUCER_CONFIG")
# librdkafka's own log lines (ops.kafka_log): the same line of one client about one broker at most once per this
# many seconds, with the count of those held back.
KAFKA_LOG_REPEAT_INTERVAL = env_float("KAFKA_LOG_REPEAT_INTERVAL", 60.0)
KAFKA_CONSUMER_CONFIG = env_json("KAFKA_CONSUMER_CONFIG")

# Outbox relay.
OUTBOX_TOPIC_PREFIX = os.environ.get("OUTBOX_TOPIC_PREFIX", "outbox.event.")
OUTBOX_DLQ_TOPIC = os.environ.get("OUTBOX_DLQ_TOPIC", "outbox.dlq")
# CloudEvents' `source` of every published event (the ce_source header): a URI reference naming this service.
OUTBOX_CLOUDEVENTS_SOURCE = os.environ.get("OUTBOX_CLOUDEVENTS_SOURCE", "/order-service")
OUTBOX_RELAY_ENABLED = env_bool("OUTBOX_RELAY_ENABLED", True)
OUTBOX_BATCH_SIZE = env_int("OUTBOX_BATCH_SIZE", 1000)
OUTBOX_POLL_INTERVAL = env_float("OUTBOX_POLL_INTERVAL", 1.0)
OUTBOX_RUN_BUDGET = env_float("OUTBOX_RUN_BUDGET", 10.0)
# Lanes of one relay run (threads, each its own connection). One: deployed, the worker's processes already run
# relays side by side (beat's poll beside the woken run), and two lanes in each were measured a third slower
# (four claimers walking each other's locked rows, ordering checks sent to the table). Two for a relay that runs
# alone (CELERY_WORKER_CONCURRENCY=1, or `relay_outbox` in one process).
OUTBOX_RELAY_LANES = env_int("OUTBOX_RELAY_LANES", 1)
OUTBOX_WAKE_ON_COMMIT = env_bool("OUTBOX_WAKE_ON_COMMIT", True)
OUTBOX_WAKE_EXPIRES = env_float("OUTBOX_WAKE_EXPIRES", 10.0)
OUTBOX_WAKE_LINGER = env_float("OUTBOX_WAKE_LINGER", 0.01)
OUTBOX_PUBLISH_TIMEOUT = env_float("OUTBOX_PUBLISH_TIMEOUT", 10.0)
# A retriable failure (broker away, timeouts, leader moves, not enough replicas) is never the event's fault: the
# event is given up only once it has failed OUTBOX_MAX_ATTEMPTS times AND has kept failing for
# OUTBOX_GIVE_UP_AFTER seconds (6 hours). 0 gives up after OUTBOX_MAX_ATTEMPTS alone. Refusals for good (too
# large, invalid topic, authorization) are dead-lettered at once; producer failures cost no attempt.
OUTBOX_MAX_ATTEMPTS = env_int("OUTBOX_MAX_ATTEMPTS", 5)
OUTBOX_GIVE_UP_AFTER = env_float("OUTBOX_GIVE_UP_AFTER", 6 * 3600.0)
OUTBOX_BACKOFF_BASE = env_float("OUTBOX_BACKOFF_BASE", 1.0)
# The cap also bounds how long an event waits after an outage ends.
OUTBOX_BACKOFF_MAX = env_float("OUTBOX_BACKOFF_MAX", 30.0)
OUTBOX_DLQ_RETRY_INTERVAL = env_float("OUTBOX_DLQ_RETRY_INTERVAL", 3600.0)
OUTBOX_DLQ_MAX_RETRIES = env_int("OUTBOX_DLQ_MAX_RETRIES", 5)
# The CDC relay (relay_cdc): the connector properties it runs (Kafka Connect's file, ${env:...} filled in), MariaDB's
# JDBC driver for the engine, and how often the engine records its binlog position (what a crash may publish again).
OUTBOX_CDC_CONNECTOR_FILE = os.environ.get(
    "OUTBOX_CDC_CONNECTOR_FILE", str(BASE_DIR / "deploy" / "debezium" / "outbox-connector.json"))
OUTBOX_CDC_JDBC_DRIVER = os.environ.get("OUTBOX_CDC_JDBC_DRIVER", "/usr/share/java/mariadb-java-client.jar")
OUTBOX_CDC_POSITION_EVERY = env_float("OUTBOX_CDC_POSITION_EVERY", 1.0)
OUTBOX_RETENTION_HOURS = env_float("OUTBOX_RETENTION_HOURS", 168.0)
OUTBOX_PURGE_BATCH_SIZE = env_int("OUTBOX_PURGE_BATCH_SIZE", 1000)

# Consumer side.
INBOX_GROUP_ID = os.environ.get("INBOX_GROUP_ID", "order-stats")
INBOX_TOPICS = [t for t in os.environ.get("INBOX_TOPICS", "outbox.event.order").split(",") if t]
INBOX_DLQ_TOPIC = os.environ.get("INBOX_DLQ_TOPIC", "order-stats.dlq")
# Messages applied per database transaction; a batch takes what has arrived, it never waits to fill up.
INBOX_BATCH_SIZE = env_int("INBOX_BATCH_SIZE", 500)
INBOX_MAX_ATTEMPTS = env_int("INBOX_MAX_ATTEMPTS", 3)
INBOX_BACKOFF_BASE = env_float("INBOX_BACKOFF_BASE", 0.5)
INBOX_RETENTION_DAYS = env_float("INBOX_RETENTION_DAYS", 30.0)

# LOG_FORMAT: json (one object per line, with event_id, order_id and attempt on relay and consumer lines)
# or plain (make run).
LOG_FORMAT = os.environ.get("LOG_FORMAT", "json")
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "ops.logging.JsonFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # Celery's lines for every task sent, received and finished: three a second from the relay's poll alone,
    # which drown what matters. Shown with LOG_LEVEL=DEBUG.
    "loggers": {
        name: {"level": "DEBUG" if LOG_LEVEL == "DEBUG" else "WARNING"}
        for name in ("celery.beat", "celery.worker.strategy", "celery.app.trace")
    },
}
# Celery would replace the root logger's handlers with its own plain format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

CELERY_BEAT_SCHEDULE = {
    "purge-processed-events": {
        "task": "inbox.tasks.purge_processed_events",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    "purge-sent-outbox-events": {
        "task": "outbox.tasks.purge_sent_events",
        "schedule": 300.0,
        "options": {"expires": 300.0},
    },
}

if OUTBOX_RELAY_ENABLED:  # off: relay_cdc publishes, and runs the DLQ sweeper itself
    CELERY_BEAT_SCHEDULE |= {
        # Safety net behind the on-commit wake-up; expires so ticks never queue up while workers are down.
        "relay-outbox": {
            "task": "relay.tasks.relay_outbox",
            "schedule": OUTBOX_POLL_INTERVAL,
            "options": {"expires": OUTBOX_POLL_INTERVAL},
        },
        "retry-undelivered-dead-letters": {
            "task": "relay.tasks.retry_dead_letters",
            "schedule": 60.0,
            "options": {"expires": 60.0},
        },
    }

SPECTACULAR_SETTINGS = {
    "TITLE": "Order service API",
    "DESCRIPTION": "Orders written with their events in one transaction (transactional outbox); "
    "per-customer stats maintained by the event consumer.",
    "VERSION": "1.0.0",
    # The schema is served by the API itself (GET /api/schema/), behind the same authentication.
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
}
