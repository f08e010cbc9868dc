"""Headless Debian Chromium for the browser tests, driven by Selenium through Debian's chromedriver.

Importing this module skips the importing test module where the browser is not installed
(``deploy/install-system-deps.sh`` installs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"browser tests need Debian's {CHROMIUM} and {CHROMEDRIVER} (deploy/install-system-deps.sh installs "
                "them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 (after the skip: only where a browser is installed)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402


@contextmanager
def headless_chromium(*arguments: str) -> Iterator[WebDriver]:
    """A headless Chromium (1280 × 1000) with `arguments` added; quit on exit."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--no-first-run", "--disable-extensions", *arguments):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
