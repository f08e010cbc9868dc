"""The status page in a real browser: Debian's Chromium (headless) driven by Selenium through chromedriver,
against a running node (real SCP, real dcmtk storescu and storescp, the API's uvicorn server).

One node for the module, with an API token and one C-STORE destination that is down at first and
one delivery attempt per job, so that a job's delivery fails and its retry button can re-send it
once a dcmtk storescp is listening. Screenshots are saved to ``$IAN_NODE_TEST_ARTEFACTS`` (else a
pytest temporary folder) and their folder is printed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from ian_node.app.node import Node
from ian_node.app.status.auth import SESSION_COOKIE
from ian_node.config import ApiConfig, DicomTarget, ExportConfig
from ian_node.net import free_port
from ian_node.phantom.study import PhantomFiles
from ian_node.storage.records import Job, JobState
from tests.integration.browser import headless_chromium  # skips this module where no browser is installed
from tests.integration.node_harness import (  # noqa: F401 (dcmtk_nodelay: a fixture)
    api_url,
    dcmtk_nodelay,
    node_config,
    running_node,
    small_phantom,
    untrained_checkpoint,
    wait_for,
)
from tests.integration.peers import storescp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("dcmtk_nodelay")]



TOKEN = "browser-test-token-0123456789abcdef"
#: Seconds a small job may take on a loaded 2-core machine, the page's polling included.
JOB_TIMEOUT = 120.0


@dataclass
class Site:
    node: Node
    url: str
    dest_port: int
    root: Path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["IAN_NODE_TEST_ARTEFACTS"]) if os.environ.get("IAN_NODE_TEST_ARTEFACTS") else (
        tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nstatus page screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("status-node")
    checkpoint = untrained_checkpoint(root / "small.pt", size=32, attention=False)
    dest_port = free_port()
    export = ExportConfig(targets=(DicomTarget(name="pacs", ae_title="DEST", host="127.0.0.1", port=dest_port,
                                               timeout_s=2),), max_attempts=1)
    config = node_config(root, checkpoint, api=ApiConfig(port=0, token=TOKEN), export=export)
    with running_node(config) as node:
        yield Site(node, api_url(node), dest_port, root)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with headless_chromium() as driver:
        yield driver


def _wait(driver: WebDriver, timeout: float, css: str) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css), f"nothing matches {css} after {timeout} s")


def _send(site: Site, phantom: PhantomFiles) -> Job:
    proc, statuses = storescu(site.node.scp.port, list(phantom.instances))
    assert statuses == [0] * len(phantom.instances), proc.stderr[-2000:]
    return wait_for(lambda: next(iter(site.node.state.jobs_of_series(phantom.series_uid)), None), JOB_TIMEOUT,
                    f"a job for series {phantom.series_uid}")


def _full_page(driver: WebDriver, path: Path) -> None:
    """A screenshot of the whole page: the viewport stretched to the document's height (DevTools), then reset."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_without_the_token_the_page_asks_for_a_login_then_opens(site: Site, browser: WebDriver,
                                                                  artefacts: Path) -> None:
    browser.get(f"{site.url}/")
    assert "/login" in browser.current_url
    browser.save_screenshot(str(artefacts / "login.png"))
    field = browser.find_element(By.ID, "token")
    field.send_keys("a-wrong-token-of-enough-length")
    field.submit()
    _wait(browser, 10, ".error-box")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token").submit()
    _wait(browser, 10, "[data-live='queue']")
    assert browser.current_url.rstrip("/") == site.url
    assert SESSION_COOKIE not in browser.execute_script("return document.cookie")  # HttpOnly
    cookie = browser.get_cookie(SESSION_COOKIE)
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]


def test_a_failed_delivery_is_retried_from_the_job_page_once_the_destination_is_up(
    site: Site, browser: WebDriver, artefacts: Path, tmp_path: Path
) -> None:
    browser.get(f"{site.url}/")
    assert "/login" not in browser.current_url, "the previous test logs in"
    phantom = small_phantom(tmp_path / "phantom", patient=0)
    job = _send(site, phantom)
    # the open page shows the new job without a reload, and then its failure (nobody listens yet)
    _wait(browser, JOB_TIMEOUT, f"tr[data-job='{job.id}']")
    _wait(browser, JOB_TIMEOUT, f"tr[data-job='{job.id}'][data-state='failed']")
    browser.find_element(By.CSS_SELECTOR, f"a[href='/ui/jobs/{job.id}']").click()
    _wait(browser, 10, "tr[data-target='pacs'][data-state='failed']")
    assert "not established" in browser.find_element(By.CSS_SELECTOR, "tr[data-target='pacs']").text
    browser.save_screenshot(str(artefacts / "job-failed.png"))
    with storescp(tmp_path / "pacs", site.dest_port):
        browser.find_element(By.CSS_SELECTOR, f"button[data-retry='{job.id}']").click()
        _wait(browser, 10, ".notice")
        _wait(browser, JOB_TIMEOUT, "tr[data-target='pacs'][data-state='delivered']")
        assert site.node.state.job(job.id).state is JobState.DONE
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "pacs").iterdir()]
    segs = [ds for ds in received if ds.Modality == "SEG"]
    assert len(segs) == 1 and segs[0].ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid


def test_a_series_sent_with_storescu_reaches_done_and_its_pictures_load(
    site: Site, browser: WebDriver, artefacts: Path, tmp_path: Path
) -> None:
    browser.get(f"{site.url}/")
    with storescp(tmp_path / "pacs", site.dest_port):
        job = _send(site, small_phantom(tmp_path / "phantom", patient=1))
        _wait(browser, JOB_TIMEOUT, f"tr[data-job='{job.id}'][data-state='done']")
    _full_page(browser, artefacts / "status.png")
    browser.get(f"{site.url}/ui/jobs/{job.id}")
    _wait(browser, 10, "img[data-picture]")
    widths = WebDriverWait(browser, 60, poll_frequency=0.25).until(lambda d: d.execute_script(
        "const imgs = Array.from(document.querySelectorAll('img[data-picture]'));"
        "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;"))
    assert len(widths) == 6 and all(w > 0 for w in widths), widths
    _full_page(browser, artefacts / "job.png")
    assert (artefacts / "job.png").stat().st_size > 10_000
