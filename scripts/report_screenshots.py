"""Headless Chromium for the report: an offline browser, and the docs' screenshots.

``python scripts/report_screenshots.py REPORT.html DIR`` opens a report (e.g.
``demo-out/report.html`` of ``make demo``) in headless Chromium with the network
cut off, and saves small PNGs of its top, its sharpness panel, its first spectral
density and its hypothesis section into DIR (docs/ holds them). The browser
tests (``tests/test_report_browser.py``) open pages with the same
:func:`offline_chrome`. Needs ``scripts/browser-up``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 900
LOAD_S = 60  # the longest a page may take to draw its figures


def offline_chrome():
    """Headless Chromium whose network is cut off three ways.

    The DevTools protocol's offline mode, every host name resolving nowhere,
    and a dead proxy; its console and performance logs are recorded.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves
        "--proxy-server=http://127.0.0.1:9",  # and any request goes nowhere
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"}
    )
    drv = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    drv.execute_cdp_cmd("Network.enable", {})
    drv.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {
            "offline": True,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": -1,
        },
    )
    return drv


def open_report(driver, page: Path) -> None:
    """Load ``page`` and wait until every figure is drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(page).resolve().as_uri())
    WebDriverWait(driver, LOAD_S).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && "
            "[...document.querySelectorAll('.plotly-graph-div')]"
            ".every(el => el.querySelector('svg.main-svg'))"
        )
    )


def save_png(png: bytes, path: Path, width: int = 900, height: float = 0) -> None:
    """A small palette PNG of a screenshot (docs stay light), cut at ``height`` px."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        if height and height < im.height:
            im = im.crop((0, 0, im.width, round(height)))
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )


def screenshots(report: Path, folder: Path) -> list[Path]:
    """Save the docs' screenshots of ``report`` into ``folder``; return their paths."""
    from selenium.webdriver.common.by import By

    folder.mkdir(parents=True, exist_ok=True)
    driver = offline_chrome()
    try:
        open_report(driver, report)
        driver.execute_script("window.scrollTo(0, 0)")
        saved = [folder / "report_top.png"]
        save_png(driver.get_screenshot_as_png(), saved[0])
        shots = {
            "report_sharpness.png": "#training figure.lg-figure:nth-of-type(3)",
            "report_density.png": "#spectra figure.lg-figure",
            "report_hypotheses.png": "#hypotheses",
        }
        for name, css in shots.items():
            found = driver.find_elements(By.CSS_SELECTOR, css)
            if not found:
                print(f"report_screenshots: {report} has no {css}; {name} skipped")
                continue
            el = found[0]
            driver.execute_script("arguments[0].scrollIntoView()", el)
            # the hypothesis section down to its table's caption
            height = driver.execute_script(
                "const t = arguments[0].querySelector('table');"
                "return t ? (t.getBoundingClientRect().bottom + 12 - "
                "arguments[0].getBoundingClientRect().top) * devicePixelRatio : 0;",
                el,
            )
            save_png(el.screenshot_as_png, folder / name, height=height)
            saved.append(folder / name)
        return saved
    finally:
        driver.quit()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/report_screenshots.py REPORT.html DIR")
    for path in screenshots(Path(sys.argv[1]), Path(sys.argv[2])):
        print(f"wrote {path}")
