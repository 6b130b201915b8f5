"""The on-commit wake-up: one queued run per quiet period, a woken run that follows commits, no lost wake-up."""

import pytest
import redis
from django.conf import settings
from django.db import transaction

from outbox.models import OutboxEvent
from outbox.services import outbox_enqueue
from relay import tasks, wake
from tests.kafka_tools import read_topic
from tests.processes import suite_env
from tests.relay.helpers import TOPIC, enqueue


@pytest.fixture
def flag():
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(wake.WAKE_KEY)
    yield client
    client.delete(wake.WAKE_KEY)


@pytest.fixture
def queued(monkeypatch):
    """Runs queued by wake-ups, recorded instead of sent to a worker."""
    calls = []
    monkeypatch.setattr(tasks.relay_outbox, "apply_async", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.django_db(transaction=True)
def test_commits_queue_one_run_until_a_run_releases_the_flag(flag, queued):
    for n in range(3):
        enqueue(f"wake-{n}", "OrderCreated")
    assert len(queued) == 1
    assert queued[0]["kwargs"] == {"woken": True} and queued[0]["expires"] == settings.OUTBOX_WAKE_EXPIRES
    assert 0 < flag.pttl(wake.WAKE_KEY) <= settings.OUTBOX_WAKE_EXPIRES * 1000

    wake.relay_wake_clear()
    enqueue("wake-3", "OrderCreated")
    assert len(queued) == 2


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transaction_wakes_nothing(flag, queued):
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox_enqueue(aggregate_type="order", aggregate_id="rolled-back", event_type="OrderCreated", payload={})
        raise RuntimeError("the order write failed")
    assert queued == [] and not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_woken_run_follows_commits_without_queuing_runs_and_misses_none(broker, flag, queued, monkeypatch, settings):
    settings.OUTBOX_WAKE_LINGER = 0.01
    enqueue("follow-0", "OrderCreated")  # the commit that queued this run
    assert len(queued) == 1
    queued.clear()

    # Commits land at fixed points of the run: before its 1st and 2nd claims, and after its last claim
    # found nothing but before it released the flag (the lost-wake-up window).
    real_run, real_clear = wake.relay_run, wake.relay_wake_clear
    runs = []

    def run_with_a_commit_before(**kwargs):
        runs.append(flag.pttl(wake.WAKE_KEY))
        if len(runs) <= 2:
            enqueue(f"follow-{len(runs)}", "OrderCreated")
        return real_run(**kwargs)

    def clear_after_a_commit():
        enqueue("follow-3", "OrderCreated")
        real_clear()

    monkeypatch.setattr(wake, "relay_run", run_with_a_commit_before)
    monkeypatch.setattr(wake, "relay_wake_clear", clear_after_a_commit)

    result = wake.relay_follow()

    assert queued == []  # every commit saw the flag held: no extra task
    assert result.sent == 4
    assert len(runs) == 4  # two with events, the empty claim that ends the following, the claim after release
    # While following, the flag outlives anything the run can take: it cannot lapse and let a second run in.
    assert min(runs[:3]) > (settings.OUTBOX_RUN_BUDGET + settings.OUTBOX_PUBLISH_TIMEOUT) * 1000
    assert runs[3] == -2  # released before the last claim
    assert not flag.exists(wake.WAKE_KEY)
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {"sent"}
    keys = {f"follow-{n}" for n in range(4)}
    records = read_topic(broker.bootstrap, TOPIC, keys=keys, until=lambda rs: len(rs) >= 4)
    assert {r.headers["id"] for r in records} == {str(e) for e in OutboxEvent.objects.values_list("event_id", flat=True)}


@pytest.mark.django_db(transaction=True)
def test_a_following_that_outlasts_a_queued_wake_up_ttl_queues_no_runs(broker, flag, queued, monkeypatch, settings):
    settings.OUTBOX_WAKE_EXPIRES, settings.OUTBOX_WAKE_LINGER = 1.0, 0.2
    # The 11 iterations below take ~2.5 s here; the budget leaves a slow machine room to fit them in one run.
    settings.OUTBOX_RUN_BUDGET = 60.0
    enqueue("long-0", "OrderCreated")
    queued.clear()
    real_run = wake.relay_run
    runs = []

    def run_with_a_commit_before(**kwargs):
        runs.append(kwargs)
        if len(runs) <= 10:  # about 2 s of following, twice the flag's TTL
            enqueue(f"long-{len(runs)}", "OrderCreated")
        return real_run(**kwargs)

    monkeypatch.setattr(wake, "relay_run", run_with_a_commit_before)
    assert wake.relay_follow().sent == 11
    assert queued == []


@pytest.mark.django_db(transaction=True)
def test_a_woken_run_that_fails_releases_the_flag(flag, queued, monkeypatch):
    enqueue("fails-0", "OrderCreated")

    def database_gone(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(wake, "relay_run", database_gone)
    with pytest.raises(RuntimeError):
        wake.relay_follow()
    assert not flag.exists(wake.WAKE_KEY)  # so the next commit queues a new run at once



@pytest.mark.django_db(transaction=True)
def test_beats_poll_publishes_what_a_worker_killed_holding_the_wake_flag_left_behind(celery_worker, broker, flag,
                                                                                      tmp_path, monkeypatch):
    import subprocess
    import sys

    from tests.kafka_tools import wait_for

    woken = []
    send = tasks.relay_outbox.apply_async
    monkeypatch.setattr(tasks.relay_outbox, "apply_async", lambda **kwargs: woken.append(kwargs) or send(**kwargs))
    # What a worker SIGKILLed in the middle of a following run leaves: the flag, held for its long TTL.
    flag.set(wake.WAKE_KEY, "1", px=120_000)
    event = enqueue("flag-left-1", "OrderCreated")
    assert woken == []  # its commit saw the flag held, and queued no run

    env = suite_env(broker)
    beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "project", "beat", "--loglevel", "WARNING",
                             "--schedule", str(tmp_path / "beat-schedule")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: OutboxEvent.objects.get(pk=event.pk).status == "sent", timeout=30, interval=0.2,
                 message="beat's poll to publish the event")
    finally:
        beat.terminate()
        beat.wait(30)
    assert flag.exists(wake.WAKE_KEY)  # it was the poll, not a wake-up: the dead worker's flag is still there
    (record,) = read_topic(broker.bootstrap, TOPIC, keys={"flag-left-1"}, until=lambda rs: len(rs) >= 1)
    assert record.headers["id"] == str(event.event_id)


def _redis_answers() -> bool:
    import subprocess

    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True, text=True).stdout.strip() == "PONG"


@pytest.mark.restarts_servers
@pytest.mark.django_db(transaction=True)
def test_redis_stopped_at_the_moment_of_a_commit_loses_the_wake_up_and_beats_poll_publishes(broker, tmp_path, caplog):
    import subprocess
    import sys

    from tests.kafka_tools import wait_for

    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], capture_output=True, timeout=30)
    try:
        wait_for(lambda: not _redis_answers(), timeout=30, interval=0.2, message="Redis to stop")
        event = enqueue("redis-down-1", "OrderCreated")  # committed; its wake-up cannot reach Redis
        assert any("could not wake the relay" in r.getMessage() for r in caplog.records)
    finally:
        # As .ci/run starts it (it keeps nothing on disk: every queue starts empty again).
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                        "--appendonly", "no"], capture_output=True, timeout=30)
        wait_for(_redis_answers, timeout=30, interval=0.2, message="Redis to answer again")
    assert OutboxEvent.objects.get(pk=event.pk).status == "pending"

    env = suite_env(broker)
    processes = [
        subprocess.Popen([sys.executable, "-m", "celery", "-A", "project", "worker", "--loglevel", "WARNING",
                          "--without-mingle", "--without-gossip", "--concurrency", "1"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "celery", "-A", "project", "beat", "--loglevel", "WARNING",
                          "--schedule", str(tmp_path / "beat-schedule")], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
    ]
    try:
        wait_for(lambda: OutboxEvent.objects.get(pk=event.pk).status == "sent", timeout=60, interval=0.2,
                 message="beat's poll to publish the event")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    (record,) = read_topic(broker.bootstrap, TOPIC, keys={"redis-down-1"}, until=lambda rs: len(rs) >= 1)
    assert record.headers["id"] == str(event.event_id)


@pytest.mark.django_db(transaction=True)
def test_with_the_relay_off_a_commit_wakes_nothing_and_writes_nothing_to_redis(flag, queued, settings):
    settings.OUTBOX_RELAY_ENABLED = False
    enqueue("relay-off", "OrderCreated")
    assert queued == [] and not flag.exists(wake.WAKE_KEY)
