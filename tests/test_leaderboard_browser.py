"""The built leaderboard in headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), served by `exitbench leaderboard serve` on 127.0.0.1: no console errors, the fronts
render, the batch-size switch and the table sorting work, every local link answers 200, and
the hostile measure name shows as text without running.

Chromium is required, not optional: without it this test fails and says how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
from test_leaderboard import HOSTILE, make_run
from test_leaderboard_analysis import write_hostile_analysis

from leaderboard import build_site
from suite.results import read_results

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT_COPY = REPO_ROOT / "runs" / "leaderboard-test" / "index.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1280,2000")
INSTALL_HINT = ("run `make setup` as root (scripts/setup.sh installs Debian's chromium and "
                "chromium-driver), or `apt-get install -y chromium chromium-driver`")
# Recorded before any page script runs: alert() calls, so a dialog is caught without blocking.
ALERT_SPY = ("window.__alerts = []; window.alert = function (message) "
             "{ window.__alerts.push(String(message)); };")
VISIBLE_POINTS = ("return Array.from(document.querySelectorAll('svg.plot .point'))"
                  ".filter(e => e.getClientRects().length > 0).length;")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver))
               if not path]
    if missing:
        pytest.fail(f"the leaderboard browser test needs {' and '.join(missing)}, not found on "
                    f"PATH; {INSTALL_HINT}", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the leaderboard browser test needs selenium; install the test extras: "
                    "`.venv/bin/pip install -e '.[test]'` (or `make setup`)", pytrace=False)
    return chromium, driver  # type: ignore[return-value]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url of index.html, site folder, rows) with the CLI's server running."""
    root = tmp_path_factory.mktemp("browser")
    run = make_run(root)
    write_hostile_analysis(run)  # the analyses page with real figures and hostile ids
    index = build_site(run, root / "site")
    log = open(root / "serve.log", "w")  # closed in the finally below
    process = subprocess.Popen(
        [sys.executable, "-m", "suite.cli", "leaderboard", "serve", "--site",
         str(index.parent), "--port", "0"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(timeout=30)
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+/index\.html", lines[0] if lines else "")
        assert match, f"`exitbench leaderboard serve` printed no URL: {lines!r}; log: " \
                      f"{(root / 'serve.log').read_text()}"
        yield match.group(0), index.parent, read_results(run / "results")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="exitbench-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(20)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ALERT_SPY})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") in ("SEVERE", "ERROR")]


def _assert_no_script_ran(driver, where: str) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    assert driver.execute_script("return window.__xss === undefined"), where
    assert driver.execute_script("return window.__alerts") == [], where
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no dialog is open


def _column(driver, table, index: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(arguments[0].tBodies[0].rows)"
        ".map(r => r.cells[arguments[1]].getAttribute('data-sort'));", table, index)


def test_leaderboard_in_headless_chromium(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    started = time.monotonic()
    url, site, rows = served
    browser.get(url)
    assert browser.title.startswith("Fronts and ranking")
    assert _console_errors(browser) == []

    # the fronts render: one plot per panel, one marker per row of the selected batch size
    batch_counts = Counter(r.batch_size for r in rows)
    panels = {(r.task, r.model, r.profile) for r in rows}
    assert browser.execute_script("return document.documentElement"
                                  ".getAttribute('data-batch-size-shown')") == "1"
    assert browser.execute_script(VISIBLE_POINTS) == batch_counts[1]
    visible_plots = [e for e in browser.find_elements(By.CSS_SELECTOR, "svg.plot")
                     if e.is_displayed()]
    assert len(visible_plots) == len(panels)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.plot polyline.front")) > 0
    shown_before = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.plot .point'))"
        ".filter(e => e.getClientRects().length).map(e => e.dataset.tokensPerS).sort();")

    # switching the batch size changes what is shown
    Select(browser.find_element(By.CSS_SELECTOR, "select.batch-select")).select_by_value("8")
    assert browser.execute_script(VISIBLE_POINTS) == batch_counts[8]
    shown_after = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.plot .point'))"
        ".filter(e => e.getClientRects().length).map(e => e.dataset.tokensPerS).sort();")
    assert shown_after != shown_before
    assert {e.get_attribute("data-batch-size") for e in
            browser.find_elements(By.CSS_SELECTOR, "div.batch-view") if e.is_displayed()} == {"8"}

    # sorting a ranking table by clicking its headers reorders its rows
    table = next(t for t in browser.find_elements(By.CSS_SELECTOR, "table.ranking")
                 if t.is_displayed())
    headers = table.find_elements(By.CSS_SELECTOR, "thead th button")
    initial = _column(browser, table, 0)
    headers[0].click()  # Measure: A to Z
    by_name = _column(browser, table, 0)
    assert by_name == sorted(initial, key=str.lower) and by_name != initial
    headers[0].click()  # again: Z to A
    assert _column(browser, table, 0) == sorted(initial, key=str.lower, reverse=True)
    headers[7].click()  # Points: most first
    points = [int(v) for v in _column(browser, table, 7)]
    assert points == sorted(points, reverse=True)
    assert table.find_element(By.CSS_SELECTOR, "thead th:nth-child(8)") \
        .get_attribute("aria-sort") == "descending"

    # the hostile measure name is text, visible, and ran nothing
    hostile_links = [e for e in browser.find_elements(By.LINK_TEXT, HOSTILE) if e.is_displayed()]
    assert hostile_links, "the hostile measure name is not shown as text"
    _assert_no_script_ran(browser, "index.html")

    screenshot = tmp_path / "index.png"
    Select(browser.find_element(By.CSS_SELECTOR, "select.batch-select")).select_by_value("1")
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(screenshot))
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"\nscreenshot of the index: {screenshot} (copied to {SCREENSHOT_COPY})")

    # every page: no console errors, nothing executed; every local link answers 200
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    status: dict[str, int] = {}
    ids: dict[str, set[str]] = {}

    def fetch(address: str) -> int:
        if address not in status:
            try:
                with urllib.request.urlopen(address, timeout=10) as response:
                    status[address] = response.status
                    if response.headers.get_content_type() == "text/html":
                        text = response.read().decode("utf-8")
                        ids[address] = set(re.findall(r'\bid="([^"]+)"', text))
            except urllib.error.HTTPError as error:
                status[address] = error.code
        return status[address]

    to_visit, visited, external = [url], set(), set()
    while to_visit:
        page = to_visit.pop()
        if page in visited:
            continue
        visited.add(page)
        browser.get(page)
        assert _console_errors(browser) == [], page
        _assert_no_script_ran(browser, page)
        links = browser.execute_script(
            "return Array.from(document.querySelectorAll('a[href], link[href], script[src], "
            "img[src]')).map(e => e.href || e.src);")
        for link in links:
            if link.startswith("data:"):
                continue
            if not link.startswith(origin + "/"):
                assert link.startswith("https://"), (page, link)  # datasheet sources only
                external.add(link)
                continue
            address, fragment = urldefrag(link)
            assert fetch(address) == 200, (page, link)
            if fragment:
                assert fragment in ids[address], (page, link)
            if address.endswith(".html"):
                to_visit.append(address)
    assert len(visited) >= 10  # index, 2 lists, 3 measures, 2 profiles, provenance, analyses
    assert any("/measures/script_alert_1___script-" in page for page in visited)
    assert len(status) > len(visited)  # stylesheets, scripts, data and figures too
    elapsed = time.monotonic() - started
    print(f"browser checks: {len(visited)} pages, {len(status)} local URLs, "
          f"{len(external)} external links not fetched, {elapsed:.1f} s")


@pytest.fixture(scope="module")
def real_site(tmp_path_factory, random_backbone, samples_dir):
    """A site built by the real runner over a real run, with a measure submitted through the
    CLI (validated by the real validator in the sandbox)."""
    import submitted_measures as sm
    from run_fixtures import write_config

    from suite.cli import main
    from suite.sandbox import SandboxSettings, sandbox_problem

    if sandbox_problem(SandboxSettings()) is not None:
        pytest.fail("bubblewrap is missing: scripts/setup.sh installs it", pytrace=False)
    root = tmp_path_factory.mktemp("real-site")
    config = write_config(root, random_backbone, samples_dir)
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    measure = root / "squared_top1.py"
    measure.write_text(sm.GOOD)
    assert main(["submit", str(measure), "--config", str(config)]) == 0
    return root / "run" / "site"


def test_a_real_run_with_a_submission_in_chromium(real_site, browser):
    """Every page of the real site loads without console errors; the submitted measure's
    validation table shows every check the validator ran as passed (or skipped), none FAIL."""
    from selenium.webdriver.common.by import By

    page = (real_site / "measures" / "squared_top1.html").as_uri()
    browser.get(page)
    assert _console_errors(browser) == []
    table = browser.find_element(By.CSS_SELECTOR, "table.checks")
    cells = browser.execute_script(
        "return Array.from(arguments[0].tBodies[0].rows).map(r => [r.cells[0].textContent, "
        "r.cells[1].textContent, r.cells[1].className]);", table)
    names = [name for name, _, _ in cells]
    assert names == ["api", "fit", "shape", "finite", "read-only", "declared-reads",
                     "determinism", "causality", "causality-tokens", "thresholds", "cost"]
    assert all(result in ("pass", "skipped") for _, result, _ in cells), cells
    assert [c for c in cells if c[1] == "pass"] and all(
        css == ("passed" if result == "pass" else "skipped") for _, result, css in cells)
    assert "Passed" in browser.find_element(By.CSS_SELECTOR, "section p.passed").text
    # the site's other pages render too, the overview among them
    for relative in ("index.html", "overview.html", "measures/index.html", "provenance.html"):
        browser.get((real_site / relative).as_uri())
        assert _console_errors(browser) == [], relative
        _assert_no_script_ran(browser, relative)
    assert browser.find_elements(By.LINK_TEXT, "squared_top1")
