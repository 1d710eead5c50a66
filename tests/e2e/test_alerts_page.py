"""The alerts page in headless Chromium: open incidents listed, score-vs-threshold and feature plots drawn.
Saves a screenshot to test-artifacts/alerts-page.png. Needs the Debian packages chromium and
chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.sinks import AlertQueries, Database
from tests.alerts_seed import seed

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not CHROMIUM.exists() or not Path(CHROMEDRIVER).exists():
    pytest.skip(
        "headless browser test needs /usr/bin/chromium and chromedriver (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(sqlite_store: Database) -> Iterator[str]:
    from pipeline.api import create_app
    from pipeline.api.server import ApiServer

    seed(sqlite_store)
    srv = ApiServer(create_app(AlertQueries(sqlite_store)), port=_free_port()).start()
    try:
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture()
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def test_page_lists_open_incidents_and_plots_the_selected_one(server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser
    drv.get(server + "/")
    WebDriverWait(drv, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "loading")
    body = drv.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-state") == "ready"
    rows = drv.find_elements(By.CSS_SELECTOR, "#incidents tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["C1", "C2"]
    assert "critical" in rows[0].text and "selected" in rows[0].get_attribute("class")
    plot = drv.find_element(By.ID, "score-plot")
    score_path = plot.find_element(By.CSS_SELECTOR, "path.score").get_attribute("d")
    assert score_path.startswith("M") and score_path.count("L") == 6  # 7 samples
    assert plot.find_element(By.CSS_SELECTOR, "path.threshold")
    assert len(plot.find_elements(By.CSS_SELECTOR, "circle.anomaly")) == 5
    bars = drv.find_elements(By.CSS_SELECTOR, "#features rect.bar")
    assert len(bars) == 6 and all(float(b.get_attribute("width")) > 0 for b in bars)
    # selecting the other incident redraws the plot for that entity
    rows[1].click()
    WebDriverWait(drv, 10).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-selected") == rows[1].get_attribute("data-id")
    )
    WebDriverWait(drv, 10).until(lambda d: "C2" in d.find_element(By.ID, "detail-title").text)
    assert len(drv.find_elements(By.CSS_SELECTOR, "#score-plot circle.anomaly")) == 1
    rows = drv.find_elements(By.CSS_SELECTOR, "#incidents tbody tr")
    rows[0].click()
    WebDriverWait(drv, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#score-plot circle.anomaly")) == 5)
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    assert drv.save_screenshot(str(out / "alerts-page.png"))
