"""The fleet dashboard in a real headless browser (Debian's chromium) against a running fleet.

`fedclip-coord serve --ops-port` runs rounds with scripted agents over mosquitto (tests/ops_fleet.py);
the page must load without console errors, show the agents and rounds, and follow the rounds as they
happen (waited for with a deadline, never slept for).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from ops_fleet import FLEET, WAIT_S, GroupAgent, ServeWithOps, play_round

from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import FLEET_GAIN
from fedclip.sdk.wire import Envelope, MsgType, encode

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(400)]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Set to a path (e.g. docs/img/dashboard.png) to keep the screenshot the test takes.
SCREENSHOT_ENV = "FEDCLIP_DASHBOARD_SCREENSHOT"
XSS = '<img src=x onerror="window.__xss=1">'


def _browser(tmp: Path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        msg = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide them: {msg}")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1900",
    ):
        opts.add_argument(arg)  # fmt: skip
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Chromium keeps its singleton socket in a folder under TMPDIR and leaves it after quit(), one
    # org.chromium.Chromium.* folder in /tmp per run: `tmp` (short: a socket path has a 108-byte
    # limit, which pytest's tmp_path exceeds) holds it and the profile, and the test removes it
    opts.add_argument(f"--user-data-dir={tmp / 'profile'}")
    service = Service(CHROMEDRIVER, env={**os.environ, "TMPDIR": str(tmp)})
    return webdriver.Chrome(service=service, options=opts)


def test_dashboard_shows_the_fleet_and_follows_rounds(mosquitto, bundle_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = bundle_factory(adapter="lora", labels=("a", "b", "c"))
    bundle_id = Manifest.load(bundle).bundle_id
    agents = [
        GroupAgent(mosquitto.url, "cam1", bundle_id, groups=("lab",)),
        GroupAgent(mosquitto.url, "cam2", bundle_id, groups=("store-7",), tuning=("g-r0", 3, 15)),
    ]
    serve = ServeWithOps(mosquitto.url, bundle, tmp_path / "state", tmp_path / "serve.log", rounds=3)
    browser = None
    chromium_tmp = tempfile.mkdtemp(prefix="fedclip-chromium-")
    try:
        serve.wait_up()
        play_round(agents, 1, accuracy=0.4)
        tasks = [a.task(2, timeout=WAIT_S) for a in agents]  # round 1 aggregated, round 2 running

        browser = _browser(Path(chromium_tmp))
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2)
        browser.get(serve.url + "/?interval_ms=500")

        def text(css: str) -> str:
            return browser.find_element(By.CSS_SELECTOR, css).text

        def rows(css: str):
            return browser.find_elements(By.CSS_SELECTOR, css)

        wait.until(lambda _: text("#last-round") == "2", "the page to show round 2")
        agent_rows = {r.get_attribute("data-agent"): r.text for r in rows("#agents tbody tr")}
        assert set(agent_rows) == {"cam1", "cam2"}
        assert "lab" in agent_rows["cam1"] and "store-7" in agent_rows["cam2"]
        # an agent serving its adapter tuned on the device says so (ops_fleet.GroupAgent's status)
        assert "tuned on device (70.0% vs 50.0%)" in agent_rows["cam1"]
        assert "g-r0 (tuning on device: epoch 3 of 15)" in agent_rows["cam2"]  # ... or still tunes it
        # the fleet's adapter a device keeps for its open-set gate, where its status names one
        assert "(fallback g-r0)" in agent_rows["cam1"] and "fallback" not in agent_rows["cam2"]
        assert rows('#agents tbody tr[data-online="true"]') and text("#agents-online") == "2"
        assert rows('#rounds tbody tr[data-round="1"][data-state="aggregated"]')
        assert rows('#rounds tbody tr[data-round="2"][data-state="collecting"]')
        assert "40.0%" in text('#rounds tbody tr[data-round="1"]')
        assert text("#fleet") == "t1" and text("#global-version") == "g-r1"
        assert text("#lineage") == "g-r1 ← g-r0"
        chart = browser.find_element(By.CSS_SELECTOR, "#chart-accuracy")
        assert chart.get_attribute("data-points") == "1"
        assert chart.find_elements(By.CSS_SELECTOR, "canvas")  # uPlot drew

        # a device-chosen string in a rejection reason is shown as text, never run as HTML
        hostile = encode(
            Envelope(MsgType.UPDATE, FLEET, "cam1", round=2, base_version=tasks[0].envelope.base_version,
                     body={"bundle_id": bundle_id, "num_samples": 1, "metrics": {XSS: "x"}}),
            tasks[0].adapter_tensors,
        )  # fmt: skip
        agents[0].send(hostile)
        wait.until(lambda _: rows("#rejections tbody tr"), "the rejection on the page")
        assert XSS in text("#rejections tbody tr") and text("#rejection-counts") == "metrics 1"
        assert browser.execute_script("return window.__xss === undefined")

        # the page follows the fleet: round 2 closes while it is open
        # ... with each agent's fleet gain (the fleet's adapter against its own of round 1)
        for a, t, gain in zip(agents, tasks, (0.05, -0.01), strict=True):
            a.send(a.update(t, 0.7, num_samples=10, metrics={FLEET_GAIN: gain}))
        wait.until(
            lambda _: rows('#rounds tbody tr[data-round="2"][data-state="aggregated"]'),
            "the page to show round 2 aggregated",
        )
        wait.until(lambda _: chart.get_attribute("data-points") == "2", "the chart's second point")
        gains = browser.find_element(By.CSS_SELECTOR, "#chart-gain")  # round 1 has none: a gap, then +2
        wait.until(lambda _: gains.get_attribute("data-points") == "2", "the fleet gain's chart")
        assert gains.find_elements(By.CSS_SELECTOR, "canvas")
        wait.until(lambda _: text("#global-version") == "g-r2", "the new global adapter")
        assert "70.0%" in text('#rounds tbody tr[data-round="2"]')
        # the mean of +5 and -1 points, and one agent of two helped; each agent's own in its row
        assert "(fleet gain +2.0 pts, 50.0% helped, 50.0% hurt)" in text('#rounds tbody tr[data-round="2"]')
        assert "fleet gain +5.0 pts" in text('#agents tbody tr[data-agent="cam1"]')
        assert "fleet gain -1.0 pts" in text('#agents tbody tr[data-agent="cam2"]')
        assert text("#lineage") == "g-r2 ← g-r1 ← g-r0"
        wait.until(lambda _: text("#last-round") == "3", "round 3 to start")

        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors

        play_round(agents, 3, accuracy=0.75)
        assert serve.finish() == 0, serve.log_path.read_text()[-3000:]
    finally:
        if browser is not None:
            browser.quit()
        shutil.rmtree(chromium_tmp, ignore_errors=True)
        for a in agents:
            a.close()
        serve.stop()
