"""The index as a reader gets it: opened from disk in headless Chromium, offline, every image decodes and
every section is there. Locally the test skips when the browser is missing (apt: chromium chromium-driver;
pip: selenium, in the test extra); in CI (CI set) it must run, so there it fails instead."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from modiff.pipelines.report_index import section_anchors, write_index

from test_report_index import make_report

REPORTS = Path(__file__).resolve().parents[2] / "reports"


def _missing() -> list[str]:
    missing = [] if shutil.which("chromedriver") else ["chromedriver (apt: chromium-driver)"]
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        missing.append("chromium (apt: chromium)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    return missing


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    missing = _missing()
    if missing:
        message = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them, so CI must have them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _report(source: str, tmp_path: Path) -> Path:
    if source == "synthetic":
        return make_report(tmp_path, preset="quick")
    out = tmp_path / source
    shutil.copytree(REPORTS / source, out, ignore=shutil.ignore_patterns("*.pdf", "*.ipynb"))
    return out


@pytest.mark.parametrize("source", ["synthetic", "paper", "quick"])
def test_index_renders_offline(browser, tmp_path: Path, source: str) -> None:
    """Built from a toy folder and from copies of the committed reports, the page loads from file://,
    each image has decoded to a non-empty picture, each section is present, and nothing was fetched from
    anywhere but the folder."""
    from selenium.webdriver.support.wait import WebDriverWait

    out = _report(source, tmp_path)
    page = write_index(out)[1]
    browser.get(page.as_uri())
    # `get` can return while a large page is still 'interactive' (seen once in CI on a loaded 2-core machine):
    # wait for the load to finish, up to a minute, instead of reading the state once.
    WebDriverWait(browser, 60).until(lambda driver: driver.execute_script("return document.readyState") == "complete")
    images = browser.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                                    "i.naturalWidth])")
    assert images and [src for src, complete, width in images if not (complete and width > 0)] == []
    ids = browser.execute_script("return Array.from(document.querySelectorAll('h2[id]')).map(h => h.id)")
    assert ids == section_anchors()
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert all(url.startswith("file://") for url in fetched)
    banner = browser.execute_script("return document.getElementById('banner') !== null")
    assert banner == (source != "paper")
