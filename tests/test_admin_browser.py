"""The admin in a real browser: Debian's Chromium (installed by `make test`), driven by Selenium, against a running
server (pytest-django's live server) on the real database and broker, at a 1400-pixel-wide window."""

import shutil
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select

from inbox.consumer import EventConsumer
from inbox.models import ConsumerDeadLetter
from outbox.models import FailedEvent, OutboxEvent
from stats.models import CustomerStats
from tests.inbox.test_consumer import created, event_headers, produce
from tests.relay.helpers import relay_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_retries")]

WIDTH, HEIGHT = 1400, 1000
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".run" / "screenshots"  # docs/ holds a copy
LIST_PAGES = ["/admin/outbox/outboxevent/", "/admin/outbox/failedevent/", "/admin/inbox/consumerdeadletter/",
              "/admin/inbox/processedevent/", "/admin/orders/order/"]


@pytest.fixture(scope="module")
def chromium():
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "make test installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(5)  # every find_element waits (bounded) for its element
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium, live_server):
    chromium.delete_all_cookies()
    chromium.base = live_server.url
    return chromium


def staff(django_user_model, *perms, superuser=False):
    name = f"op-{uuid.uuid4().hex[:6]}"
    user = django_user_model.objects.create_user(username=name, password="a-long-pass-phrase", is_staff=True,
                                                 is_superuser=superuser)
    user.user_permissions.add(*Permission.objects.filter(codename__in=perms))
    return user


def log_in(browser, user):
    browser.get(browser.base + "/admin/login/")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys("a-long-pass-phrase")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert browser.find_element(By.ID, "user-tools").text.upper().find(user.username.upper()) != -1


def page_width(browser) -> int:
    return browser.execute_script("return document.documentElement.scrollWidth")


def screenshot(browser, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / name))


def run_action(browser, label):
    browser.find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_visible_text(label)
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()


def test_log_in_and_the_overview_shows_health_and_consumers(browser, django_user_model, dead_event, broker,
                                                             settings):
    # A consumer group that applied two of three messages: its lag is one.
    topic, group_id = f"browser-{uuid.uuid4().hex[:8]}", f"browser-{uuid.uuid4().hex[:6]}"
    broker.create_topics(topic, partitions=1)
    settings.INBOX_TOPICS = [topic]
    for total in ("1.00", "2.00", "3.00"):
        produce(broker.bootstrap, topic, value=created(total=total), headers=event_headers())
    EventConsumer(group_id=group_id, topics=[topic], dlq_topic="order-stats.dlq", max_attempts=1,
                  backoff_base=0.01).run(max_messages=2, idle_timeout=30)

    log_in(browser, staff(django_user_model, superuser=True))
    browser.get(browser.base + "/admin/outbox/outboxevent/overview/")
    content = browser.find_element(By.ID, "content").text
    assert "Health" in content and "Consumers" in content and "Recent failures" in content
    checks, consumers = browser.find_elements(By.CSS_SELECTOR, "#content table")[:2]
    assert {"database", "redis", "kafka"} <= set(checks.text.lower().split())
    assert "failing" not in checks.text
    (row,) = [r.text for r in consumers.find_elements(By.TAG_NAME, "tr") if r.text.startswith(group_id)]
    assert row.split()[1] == "1", row  # group, lag, ...
    assert str(dead_event.event_id) in content
    assert page_width(browser) <= WIDTH
    screenshot(browser, "admin-overview.png")


def test_every_list_page_fits_a_1400_pixel_screen(browser, django_user_model, dead_event):
    ConsumerDeadLetter.objects.create(group_id="order-stats", topic="outbox.event.order", partition=0, offset=7,
                                      key="1", value="{not json", headers={"id": str(uuid.uuid4())},
                                      event_id=str(uuid.uuid4()), error="poison message: value is not JSON " * 8,
                                      attempts=1, dlq_topic="order-stats.dlq")
    log_in(browser, staff(django_user_model, superuser=True))
    for page in LIST_PAGES:
        browser.get(browser.base + page)
        browser.find_element(By.ID, "changelist")
        assert page_width(browser) <= WIDTH, f"{page} is {page_width(browser)} px wide"


def test_a_failed_event_is_inspected_and_requeued_by_an_operator_with_the_permission(browser, django_user_model,
                                                                                     dead_event):
    operator = staff(django_user_model, "view_failedevent", "requeue_failedevent", "view_outboxevent")
    log_in(browser, operator)
    failed = FailedEvent.objects.get()
    browser.get(browser.base + "/admin/outbox/failedevent/")
    browser.find_element(By.LINK_TEXT, str(failed.event_id)).click()
    detail = browser.find_element(By.ID, "content").text
    assert failed.error[:40] in detail and dead_event.aggregate_id in detail
    screenshot(browser, "admin-failed-event.png")

    browser.get(browser.base + "/admin/outbox/failedevent/")
    run_action(browser, "Requeue selected failed events")
    assert "requeued" in browser.find_element(By.CSS_SELECTOR, "ul.messagelist").text.lower()
    failed.refresh_from_db()
    assert failed.status == FailedEvent.Status.REQUEUED and failed.requeued_by == operator
    relay_until(lambda: OutboxEvent.objects.get().status == "sent", timeout=20, message="requeued event sent")


def test_an_operator_without_the_permission_is_not_offered_the_requeue(browser, django_user_model, dead_event):
    log_in(browser, staff(django_user_model, "view_failedevent", "view_outboxevent"))
    browser.get(browser.base + "/admin/outbox/failedevent/")
    browser.find_element(By.ID, "changelist")
    labels = [option.text for option in browser.find_elements(By.CSS_SELECTOR, "select[name=action] option")]
    assert "Requeue selected failed events" not in labels
    assert FailedEvent.objects.get().status == FailedEvent.Status.DEAD_LETTERED


def test_a_consumer_dead_letter_is_replayed_through_its_handler(browser, django_user_model):
    event_id = str(uuid.uuid4())
    ConsumerDeadLetter.objects.create(
        group_id="order-stats", topic="outbox.event.order", partition=0, offset=3, key="42",
        value='{"order_id": "42", "customer_id": "c-replayed", "total": "12.50", "items": []}',
        headers={"id": event_id, "eventType": "OrderCreated", "aggregateType": "order", "aggregateId": "42"},
        event_id=event_id, error="handler failed: OperationalError('a bug since fixed')", attempts=3,
        dlq_topic="order-stats.dlq")
    operator = staff(django_user_model, "view_consumerdeadletter", "replay_consumerdeadletter")
    log_in(browser, operator)
    browser.get(browser.base + "/admin/inbox/consumerdeadletter/")
    run_action(browser, "Replay selected dead letters through their handler")
    assert "1 applied" in browser.find_element(By.CSS_SELECTOR, "ul.messagelist").text
    assert CustomerStats.objects.get(customer_id="c-replayed").orders_created == 1
    record = ConsumerDeadLetter.objects.get()
    assert (record.replay_outcome, record.replayed_by) == ("applied", operator)
