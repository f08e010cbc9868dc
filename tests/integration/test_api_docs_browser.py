"""Swagger UI at /docs renders every route in a real browser that can reach nothing but the node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from ian_node.app.node import Node
from ian_node.config import ApiConfig
from tests.integration.browser import headless_chromium  # skips this module where no browser is installed
from tests.integration.node_harness import api_url, node_config, running_node, untrained_checkpoint

pytestmark = pytest.mark.integration



TOKEN = "docs-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("docs-node")
    checkpoint = untrained_checkpoint(root / "small.pt", size=32, attention=False)
    with running_node(node_config(root, checkpoint, api=ApiConfig(port=0, token=TOKEN))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium whose host names all fail to resolve (a hospital network without a CDN)."""
    with headless_chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1") as driver:
        yield driver


def test_swagger_ui_renders_every_operation_from_the_nodes_own_files_behind_the_token(
    node: Node, browser: WebDriver
) -> None:
    url = api_url(node)
    # what a reverse proxy in front of the node would add to every request
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {TOKEN}"}})
    browser.get(f"{url}/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    operations = {(block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
                   block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
                  for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert operations == {("GET", "/health"), ("GET", "/metrics"), ("GET", "/jobs"), ("POST", "/jobs"),
                          ("GET", "/jobs/{job_id}"), ("POST", "/jobs/{job_id}/retry"), ("GET", "/series")}
    assert browser.find_elements(By.CSS_SELECTOR, ".auth-wrapper .authorize")  # the bearer scheme is declared
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(name.startswith(f"{url}/") for name in fetched), fetched
