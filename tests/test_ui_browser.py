"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

What a person sees: after pasting a token, the swarm's two nodes; a task submitted through the
API (to the node that is not principal) appears in the list without a reload; its page draws a loss curve that
grows epoch by epoch until it succeeds; a node killed with SIGKILL disappears from the list.
``./scripts/test`` installs the browser (apt) when it is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.nodeutil import token
from tests.swarmutil import Swarm, agreed

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CONVERGE = 60.0
SEEN = 120.0  # generous: a worker's first torch import on a loaded two-core machine takes tens of seconds
GONE = 90.0  # a dead node's record lapses after dht.record_ttl_seconds (8 s here) plus a refresh
EPOCHS = 30
# Where to leave the screenshots (the README's come from here): $P2PNN_UI_SCREENSHOTS, else the test's tmp dir.
SCREENSHOTS_ENV = "P2PNN_UI_SCREENSHOTS"


@pytest.fixture
def swarm(postgres_url: str, tmp_path: Path) -> Iterator[Swarm]:
    schema = f"p2pnn_ui_{os.getpid()}_{secrets.token_hex(4)}"
    s = Swarm(tmp_path / "swarm", postgres_url, schema)
    try:
        yield s
    finally:
        s.stop_all()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def browser() -> Iterator[object]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                    "(./scripts/test does it when run as root)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, check, timeout: float, what: str):
    """Until ``check(driver)`` is true; an element replaced by a live update meanwhile is simply looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: check(d), message=what
    )


def _rows(driver, table: str, attr: str) -> list[str]:
    # Read in one script: the table is re-rendered at every event, so elements found one call earlier go stale.
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(r => r.getAttribute(arguments[1]))",
        f"#{table} tbody tr[{attr}]", attr,
    )


def _click(driver, by: str, value: str) -> None:
    """Click what a person would click, looking it up again if a live update replaced it first."""
    _wait(driver, lambda d: d.find_element(by, value).click() or True, 30, f"click {value}")


def test_dashboard_shows_the_swarm_a_growing_curve_and_a_dead_node_gone(swarm: Swarm, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    for name in ("n0", "n1"):
        swarm.start(name, env={"P2PNN_COMPUTE__SLOTS": "1"})
    swarm.wait_for(agreed(2), CONVERGE)
    # The principal runs no tasks in a swarm: the page is read from it, the other node does the work.
    principal = next(iter(swarm.views().values()))["principal"]
    lead_name, lead = next((n, p) for n, p in swarm.nodes.items() if p.node_id == principal)
    work_name, work = next((n, p) for n, p in swarm.nodes.items() if p.node_id != principal)

    viewer = token(swarm.root / lead_name, "viewer", sub="dashboard")
    browser.get(f"{lead.url}/ui")
    browser.find_element(By.ID, "login-token").send_keys(viewer)
    browser.find_element(By.ID, "login-button").click()
    _wait(browser, lambda d: set(_rows(d, "nodes", "data-node-id")) == {lead.node_id, work.node_id}, SEEN, "both nodes listed")
    assert viewer not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('p2pnn.token')") == viewer
    _wait(browser, lambda d: f"principal {principal[:8]}" in d.find_element(By.ID, "cluster").text, SEEN, "the principal named")
    assert "swarm testswarm" in browser.find_element(By.ID, "cluster").text

    # A task submitted through the API, to the other node, appears without a reload.
    operator = token(swarm.root / work_name, "operator", sub="api-user")
    # Batches of 2 make an epoch last long enough (~0.5 s) for the page to draw the curve in several steps
    # even on an idle machine, where a default epoch is over before the next event reaches the page.
    spec = {"kind": "train", "model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": EPOCHS, "seed": 0,
            "batch_size": 2}
    task = httpx.post(f"{work.url}/api/v1/tasks", json=spec, headers={"Authorization": f"Bearer {operator}"}, timeout=30).json()
    _wait(browser, lambda d: task["id"] in _rows(d, "tasks", "data-task-id"), SEEN, "the submitted task listed")

    # Its page: the curve grows while it runs, and ends with every epoch drawn.
    _click(browser, By.CSS_SELECTOR, f"#tasks tr[data-task-id='{task['id']}']")
    _wait(browser, lambda d: d.find_element(By.ID, "task-id").text == task["id"], SEEN, "the task page")
    drawn: list[int] = []

    def finished(d) -> bool:
        points = int(d.find_element(By.ID, "chart-loss").get_attribute("data-points"))
        if not drawn or drawn[-1] != points:
            drawn.append(points)
        if 0 < points < EPOCHS and not (shots / "dashboard-task-running.png").exists():
            d.save_screenshot(str(shots / "dashboard-task-running.png"))
        return d.find_element(By.ID, "task-state").text == "succeeded" and points == EPOCHS

    _wait(browser, finished, SEEN, "the curve complete and the task succeeded")
    assert drawn == sorted(drawn) and len([n for n in drawn if 0 < n < EPOCHS]) >= 2, drawn  # it grew, in steps
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-loss canvas"), "uPlot drew no canvas"
    assert "test_accuracy" in browser.find_element(By.ID, "task-result").text
    assert browser.find_element(By.CSS_SELECTOR, "[data-artifact='model.safetensors']").is_displayed()
    browser.save_screenshot(str(shots / "dashboard-task.png"))

    # A sweep's page lists its trials as they run and, once it ends, names the best one.
    sweep_spec = {"kind": "sweep", "base": {**spec, "epochs": 2, "batch_size": 64}, "space": {"lr": [0.001, 0.01]}, "parallelism": 2,
                  "early_stopping": {"rule": "none"}}
    sweep = httpx.post(f"{work.url}/api/v1/tasks", json=sweep_spec, headers={"Authorization": f"Bearer {operator}"},
                       timeout=30).json()
    browser.get(f"{lead.url}/ui#/tasks/{sweep['id']}")
    _wait(browser, lambda d: d.find_element(By.ID, "task-id").text == sweep["id"], SEEN, "the sweep's page")
    _wait(browser, lambda d: len(_rows(d, "trials", "data-task-id")) == 2 and d.find_element(By.ID, "task-state").text == "succeeded"
          and _rows(d, "trials", "data-state") == ["succeeded", "succeeded"], SEEN, "two trials listed, the sweep done")
    _wait(browser, lambda d: d.find_element(By.ID, "trials-best").text.startswith("best: trial "), 30, "the best trial named")
    assert '"lr"' in browser.find_element(By.ID, "trials").text
    browser.save_screenshot(str(shots / "dashboard-sweep.png"))

    # Back to the overview; kill the working node: it disappears from the list.
    _click(browser, By.LINK_TEXT, "← all tasks")
    _wait(browser, lambda d: len(_rows(d, "nodes", "data-node-id")) == 2 and set(_rows(d, "tasks", "data-state")) == {"succeeded"},
          SEEN, "the overview again, the task succeeded")
    browser.save_screenshot(str(shots / "dashboard-swarm.png"))
    killed_at = time.monotonic()
    swarm.kill(work_name)
    _wait(browser, lambda d: _rows(d, "nodes", "data-node-id") == [lead.node_id], GONE, "the killed node gone")
    print(f"killed node gone from the page after {time.monotonic() - killed_at:.1f} s; curve steps {drawn}")
    assert browser.find_element(By.ID, "member-count").text == "1"
