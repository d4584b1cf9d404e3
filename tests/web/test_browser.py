"""The dead-letter console in a real browser: a real prefork worker dead-letters real tasks
(one with ``<script>alert(1)</script>`` as its argument), ``celery dlq web`` serves them, and
headless chromium (the system's, through its chromedriver) lists, filters, shows, replays one,
purges one after confirming, and is refused a POST without the CSRF token.

With ``RESILIENT_TASKS_SCREENSHOTS=docs/img`` it writes ``dlq-web-*.png`` there (the images of
docs/dlq-tools.md); otherwise it writes none. Without chromium and chromedriver the test is
skipped, and fails under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from apps.base import ENV_SETTINGS
from resilient_tasks.dlq import DeadLetters, QueueNotFound
from support.brokers import Broker, make_broker
from support.worker import TESTS_DIR, Worker, WorkerRunner

pytestmark = pytest.mark.worker

XSS = "<script>alert(1)</script>"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = os.environ.get("RESILIENT_TASKS_SCREENSHOTS")


@pytest.fixture(params=["filesystem", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """The embedded filesystem broker (no server), and Redis (skipped when it is down)."""
    return make_broker(request.param, tmp_path)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium through the system's chromedriver; nothing is downloaded."""
    binary = next((path for path in CHROMIUM if os.path.exists(path)), None)
    if binary is None or not os.path.exists(CHROMEDRIVER):
        reason = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires them", pytrace=False)
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def dead_letters(letters: DeadLetters) -> int:
    """How many dead letters there are (none before the first: the queue does not exist)."""
    try:
        return len(letters.list())
    except QueueNotFound:
        return 0


@contextmanager
def console(worker: Worker, dlq: str, tmp_path: Path) -> Iterator[str]:
    """Run ``celery -A apps.tools_app dlq web --port 0`` as a user would; yield its address."""
    env = {
        **os.environ,
        ENV_SETTINGS: json.dumps(worker.settings),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RESILIENT_TASKS_WEB_TOKEN", None)
    output = tmp_path / "console.out"
    command = [sys.executable, "-m", "celery", "-A", "apps.tools_app", "dlq", "web"]
    with output.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", "0", "--queue", dlq],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def address() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f"dlq web exited:\n{output.read_text()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", output.read_text())
            return found.group(1) if found else None

        url = wait_for(address, "the console's address")
        with urllib.request.urlopen(url + "/", timeout=30) as response:
            assert response.status == 200
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def shot(driver: Any, name: str) -> None:
    """Save a screenshot of the page as docs/img/dlq-web-<name>.png when asked to."""
    if SCREENSHOTS:
        folder = Path(SCREENSHOTS)
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"dlq-web-{name}.png"))


def test_the_console_in_a_browser(workers: WorkerRunner, browser: Any, tmp_path: Path) -> None:
    queue = workers.broker.queue_name()
    dlq = f"{queue}.dlq"
    worker = workers.start("apps.tools_app", queues=[queue])
    broken = tmp_path / "broken"
    broken.write_text("the upstream is down")
    flaky = worker.send("tools.flaky", 1, str(broken)).id  # retries, then gives up
    client = worker.client
    xss = client.send_task("tools.export", args=[XSS], queue=queue).id
    doomed = client.send_task("tools.export", args=["to purge"], queue=queue).id
    login = client.send_task(
        "tools.login", args=["alice"], kwargs={"password": "hunter2"}, queue=queue
    ).id
    letters = DeadLetters(client, [dlq])
    wait_for(lambda: dead_letters(letters) == 4, "4 dead letters", timeout=90)

    with console(worker, dlq, tmp_path) as url:
        browse(browser, url, worker, broken, letters, ids=(flaky, xss, doomed, login))


def browse(
    driver: Any,
    url: str,
    worker: Worker,
    broken: Path,
    letters: DeadLetters,
    ids: tuple[str, str, str, str],
) -> None:
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    flaky, xss, doomed, login = ids
    text = lambda: driver.find_element(By.TAG_NAME, "main").text  # noqa: E731

    def follow(by: str, value: str) -> None:
        """Click what leads to another page, and wait until the next page is there (a click
        returns before it is). Under load chromium may refuse a click on a page it is still
        settling ("Node ... does not belong to the document"): that click did nothing, so
        it is made again."""
        page = driver.find_element(By.TAG_NAME, "html")

        def clicked(_: Any) -> bool:
            driver.find_element(by, value).click()
            return True

        WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(clicked)
        WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )

    # The counts.
    driver.get(url + "/")
    assert "4 dead letters in 1 queue" in text()
    assert "retries_exhausted" in text()
    shot(driver, "stats")

    # The list, then filtered by reason.
    follow(By.LINK_TEXT, "List")
    assert all(task_id in text() for task_id in (flaky, xss, doomed, login))
    shot(driver, "list")
    Select(driver.find_element(By.NAME, "reason")).select_by_value("retries_exhausted")
    follow(By.CSS_SELECTOR, "form.filters button")
    assert "reason=retries_exhausted" in driver.current_url
    assert flaky in text()
    assert xss not in text()
    assert "1 dead letter" in text()

    # One dead letter: the script argument is text, and never runs.
    driver.get(f"{url}/letters")
    follow(By.LINK_TEXT, xss)
    assert XSS in driver.find_element(By.CSS_SELECTOR, "code.args").text
    assert "NotImplementedError" in text()
    assert "Traceback" in driver.find_element(By.CSS_SELECTOR, "pre.traceback").text
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    shot(driver, "letter")

    # The secret stays redacted.
    driver.get(f"{url}/letters/{login}")
    assert "hunter2" not in driver.page_source
    assert "[REDACTED]" in driver.find_element(By.CSS_SELECTOR, "code.kwargs").text

    # Replay one, the bug fixed: it runs again on the worker.
    broken.unlink()
    driver.get(f"{url}/letters/{flaky}")
    follow(By.LINK_TEXT, "Replay…")
    assert "Replay 1 dead letter?" in text()
    shot(driver, "confirm-replay")
    follow(By.XPATH, "//button[text()='Yes, replay 1']")
    assert "Replayed 1 of 1" in text()
    worker.wait_for(
        lambda: any(a.get("n") == 1 for a in worker.attempts()), 60, "the replayed task to run"
    )

    # Purge one, after confirming.
    driver.get(f"{url}/letters/{doomed}")
    follow(By.LINK_TEXT, "Purge…")
    assert "Purge 1 dead letter?" in text()
    assert "no undo" in text()
    shot(driver, "confirm-purge")
    follow(By.XPATH, "//button[text()='Yes, purge 1']")
    assert "Purged 1 dead letter for good" in text()
    assert sorted(letter.id for letter in letters.list()) == sorted([xss, login])

    # A POST without the CSRF token is refused, and changes nothing.
    driver.get(f"{url}/purge?id={xss}")
    driver.execute_script("document.querySelector('input[name=csrf_token]').remove()")
    follow(By.XPATH, "//button[text()='Yes, purge 1']")
    assert "Error 403" in text()
    assert "CSRF" in text()
    assert sorted(letter.id for letter in letters.list()) == sorted([xss, login])

    driver.get(url + "/")
    assert "2 dead letters in 1 queue" in text()
