import pytest
import redis
from django.conf import settings as django_settings

from relay.kafka import producer
from tests.kafka_tools import Broker, env_bootstrap

PROJECT_TOPICS = ("outbox.event.order", "outbox.dlq", "order-stats.dlq")


class ExternalBroker(Broker):
    """A broker the tests do not control (TEST_KAFKA_BOOTSTRAP_SERVERS): outage tests skip."""

    def __init__(self, bootstrap: str):
        super().__init__(topics=PROJECT_TOPICS)
        self.bootstrap = bootstrap

    def start(self):
        self.create_topics(*self.topics)

    def stop(self):
        pytest.skip("the broker is external; this test needs to kill it")


@pytest.fixture(scope="session")
def broker():
    if env_bootstrap():
        external = ExternalBroker(env_bootstrap())
        external.start()
        yield external
        return
    broker = Broker(topics=PROJECT_TOPICS)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def mock_cluster():
    """librdkafka's mock cluster (three brokers) in a process of its own, for the faults of a real cluster:
    leader moves, brokers down, injected request errors (chaos.mock_cluster)."""
    from chaos.mock_cluster import MockCluster

    cluster = MockCluster(brokers=3, topics={"outbox.event.order": 6, "outbox.dlq": 1, "order-stats.dlq": 1})
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def on_mock_cluster(mock_cluster, settings):
    """The relay and consumer of this test talk to the mock cluster; every fault injected is cleared after it."""
    settings.KAFKA_BOOTSTRAP_SERVERS = mock_cluster.bootstrap
    producer.discard("the test moves to the mock cluster")
    yield mock_cluster
    mock_cluster.call("broker_up", broker=-1)
    for api in ("Produce", "Fetch", "OffsetCommit", "JoinGroup", "SyncGroup", "Heartbeat", "InitProducerId",
                "FindCoordinator", "Metadata"):
        mock_cluster.call("clear_errors", api=api)


@pytest.fixture(autouse=True)
def kafka_settings(broker, settings):
    settings.KAFKA_BOOTSTRAP_SERVERS = broker.bootstrap
    yield
    producer.discard("test finished")
    producer.troubled = False


@pytest.fixture
def celery_worker(broker, transactional_db):
    """A real Celery worker (in a thread) consuming from Redis; tests using it see committed data only."""
    from celery.contrib.testing.worker import start_worker

    from project.celery import app

    redis.Redis.from_url(django_settings.CELERY_BROKER_URL).flushdb()
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10, loglevel="WARNING"):
        yield


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw")


@pytest.fixture
def api(user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def broker_outage(broker):
    """The test broker, which the test may kill; it is running again (empty) after the test."""
    if isinstance(broker, ExternalBroker):
        pytest.skip("the broker is external; this test needs to kill it")
    yield broker
    if broker.process is None:
        broker.start()


@pytest.fixture
def fast_retries(settings):
    settings.OUTBOX_PUBLISH_TIMEOUT = 2.0
    settings.OUTBOX_BACKOFF_BASE = 0.1
    settings.OUTBOX_BACKOFF_MAX = 0.5
    return settings


@pytest.fixture
def dead_event(api, settings):
    """An event dead-lettered for real: its topic is refused by the broker."""
    from outbox.models import FailedEvent, OutboxEvent
    from tests.relay.helpers import ORDER, relay_until

    settings.OUTBOX_MAX_ATTEMPTS = 1
    good_prefix = settings.OUTBOX_TOPIC_PREFIX
    settings.OUTBOX_TOPIC_PREFIX = "bad topic name "
    api.post("/api/orders/", ORDER, format="json")
    relay_until(lambda: FailedEvent.objects.exists(), timeout=20, message="dead-lettered")
    settings.OUTBOX_TOPIC_PREFIX = good_prefix
    return OutboxEvent.objects.get()
