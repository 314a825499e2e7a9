"""The reading page in a real browser: headless Chromium (Debian's) driven by Selenium.

A reader opens their link, answers a pairwise task with the keyboard, reloads in the middle of
the study and continues where they left off, drafts one impression from scratch and edits one
draft, and reaches the end; the answers are in the database and ``analyze`` reports them. A
screenshot of each page is taken (``FEDMIRA_SCREENSHOTS=DIR`` keeps them: the README's come from
here). ``make test`` installs chromium and chromium-driver when they are missing (``make
browser``); without them this test is skipped, unless ``FEDMIRA_REQUIRE_BROWSER=1`` (CI) makes
that a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from fedmira.cli import main
from fedmira.common.reports import Report, write_jsonl
from tests.unit.test_reader_study_web import page_in_thread

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _need_browser() -> None:
    if CHROMIUM and DRIVER:
        return
    why = "chromium and chromium-driver are not installed (`make browser` installs them)"
    if os.environ.get("FEDMIRA_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _compare_folder(root: Path) -> Path:
    reports = [
        Report(
            f"r{i:03d}",
            f"site_{i % 2}",
            "XR",
            "chest",
            "chest",
            f"Synthetic findings {i}: lungs are clear, no effusion.",
            f"Synthetic reference {i}.",
        )
        for i in range(8)
    ]
    write_jsonl(reports, root / "cases.jsonl")
    (root / "predictions").mkdir(parents=True)
    with (root / "predictions" / "fedavg.jsonl").open("w") as f:
        for r in reports:
            f.write(f'{{"report_id": "{r.report_id}", "impression": "No acute cardiopulmonary process."}}\n')
    return root


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """A 2-reader study on a live server; yields (base url, study folder, reader0's token)."""
    _need_browser()
    folder = tmp_path / "study"
    assert (
        main(
            [
                "reader-study",
                "create",
                "--compare",
                str(_compare_folder(tmp_path / "cmp")),
                "--reader",
                "Dr A@Centre 1",
                "--reader",
                "Dr B@Centre 2",
                "--readers-per-item",
                "1",
                "--n-cases",
                "4",
                "--draft-cases",
                "2",
                "--draft-system",
                "fedavg",
                "--seed",
                "1",
                "--out",
                str(folder),
            ]
        )
        == 0
    )
    with (folder / "tokens.csv").open() as f:
        token = next(row["token"] for row in csv.DictReader(f) if row["name"] == "Dr A")
    with page_in_thread(folder) as port:
        yield f"http://127.0.0.1:{port}", folder, token


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def _shot(driver: Any, name: str, tmp: Path) -> None:
    target = Path(os.environ.get("FEDMIRA_SCREENSHOTS") or tmp)
    target.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(target / f"reader-study-{name}.png"))


def _wait_text(driver: Any, element_id: str, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in driver.find_element("id", element_id).text:
        assert time.monotonic() < deadline, f"#{element_id} never showed {text!r}"
        time.sleep(0.1)


def test_a_reader_answers_both_tasks_reloads_and_resumes(
    page: tuple[str, Path, str], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    base, folder, token = page
    with sqlite3.connect(folder / "study.sqlite") as conn:
        total = conn.execute("SELECT COUNT(*) FROM tasks WHERE reader_id = 0").fetchone()[0]
    browser.get(f"{base}/")  # no link, no cookie: the login form
    assert browser.find_element("id", "login").is_displayed()
    _shot(browser, "login", tmp_path)
    browser.get(f"{base}/#token={token}")
    _wait_text(browser, "who", "Dr A (Centre 1)")
    assert "#token" not in browser.current_url  # the token left the address bar
    _wait_text(browser, "progress", f"0 of {total} answered")
    assert browser.find_element("id", "pairwise").is_displayed()
    assert "Synthetic findings" in browser.find_element("id", "pw-findings").text
    _shot(browser, "pairwise", tmp_path)
    body = browser.find_element("tag name", "body")
    body.send_keys("1", "r", "f")  # A better, A rated 4, B rated 4
    browser.find_element("css selector", 'input[name="flags_b"][value="wrong_severity"]').click()
    body.send_keys(Keys.ENTER)
    _wait_text(browser, "progress", f"1 of {total} answered")

    browser.refresh()  # mid-study: the cookie logs in again and the page continues
    _wait_text(browser, "progress", f"1 of {total} answered")
    _wait_text(browser, "who", "Dr A (Centre 1)")
    while browser.find_element("id", "pairwise").is_displayed():
        done = int(browser.find_element("id", "progress").text.split()[0])
        browser.find_element("tag name", "body").send_keys("2", "e", "d", Keys.ENTER)  # equal, both rated 3
        _wait_text(browser, "progress", f"{done + 1} of {total} answered")

    drafted = 0
    while browser.find_element("id", "draft").is_displayed():
        box = browser.find_element("id", "dr-text")
        if drafted == 0:
            _shot(browser, "draft", tmp_path)
        time.sleep(0.3)  # some active time
        box.send_keys(" Reviewed." if box.get_attribute("value") else "No acute findings.")
        box.send_keys(Keys.CONTROL, Keys.ENTER)
        drafted += 1
        _wait_text(browser, "progress", f"{total - 2 + drafted} of {total} answered")
    assert drafted == 2
    assert browser.find_element("id", "done").is_displayed()
    _shot(browser, "done", tmp_path)

    with sqlite3.connect(folder / "study.sqlite") as conn:
        rows = conn.execute(
            "SELECT t.kind, a.preference, a.accept_a, a.flags_b, a.text, a.active_ms "
            "FROM answers a JOIN tasks t USING (task_id) WHERE a.reader_id = 0 "
            "ORDER BY t.position"
        ).fetchall()
    assert len(rows) == total
    assert rows[0][:4] == ("pairwise", "A", 4, '["wrong_severity"]')
    drafts = [r for r in rows if r[0] == "draft"]
    assert {r[4].endswith("Reviewed.") or r[4] == "No acute findings." for r in drafts} == {True}
    assert all(r[5] > 0 for r in drafts)  # active time was measured
    assert main(["reader-study", "analyze", str(folder)]) == 0
    assert (folder / "analysis" / "report.md").is_file()
