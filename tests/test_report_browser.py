"""The HTML report in a real browser: headless Chromium driven by Selenium.

The page is opened from ``file://`` with the network cut off three ways (the
DevTools protocol's offline mode, every host name resolving nowhere, and a dead
proxy); every request the browser makes is recorded from its performance log
and must be the page itself (``file:``) or inline data (``data:``). The console
must hold no error, every figure container must hold a drawn plot, and a
screenshot must not be blank.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/browser-up``
installs them). Without them the tests skip, unless LOSSGEOM_REQUIRE_BROWSER=1
(as in CI): then they fail. The browser and the page loading come from
``scripts/report_screenshots.py``, which also saves the docs' screenshots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from lossgeom.report import write_report

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from report_screenshots import (  # noqa: E402
    CHROMIUM,
    DRIVER,
    offline_chrome,
    open_report,
    screenshots,
)

REQUIRED = os.environ.get("LOSSGEOM_REQUIRE_BROWSER") == "1"


def _browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install selenium pillow)"
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} not found: install {package} with scripts/browser-up"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    problem = _browser_problem()
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"LOSSGEOM_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def driver(browser_available):
    drv = offline_chrome()
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The example study's page, the single run's, and a run with no metrics."""
    from test_report_html import make_example

    study, run = make_example(tmp_path_factory.getbasetemp() / "report-example")
    out = tmp_path_factory.mktemp("browser")
    bare = out / "bare-run"
    shutil.copytree(run, bare)
    (bare / "metrics.jsonl").unlink()
    return {
        "study": write_report(study, out / "study.html", progress=False),
        "run": write_report(run, out / "run.html", progress=False),
        "bare": write_report(bare, out / "bare.html", progress=False),
    }


def _open(driver, page: Path) -> dict:
    """Load ``page``, wait for every figure; return its logs and requests."""
    driver.get_log("browser")  # start from empty logs
    driver.get_log("performance")
    open_report(driver, page)
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    return {"console": driver.get_log("browser"), "requests": requests}


def _variance(png: bytes) -> float:
    import io

    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as im:
        return ImageStat.Stat(im.convert("L")).var[0]


@pytest.mark.parametrize("name", ["study", "run", "bare"])
def test_the_page_renders_offline_without_errors(driver, pages, name):
    page = pages[name]
    seen = _open(driver, page)
    # the only requests: the page itself and inline data
    assert page.resolve().as_uri() in seen["requests"]
    for url in seen["requests"]:
        assert url.startswith(("file:", "data:")), url
    severe = [e for e in seen["console"] if e["level"] == "SEVERE"]
    assert not severe, severe
    assert driver.execute_script("return typeof Plotly") == "object"
    # every figure container holds a drawn plot with its traces
    expected = len(re.findall(r'class="lg-figure"', page.read_text()))
    counts = driver.execute_script(
        "const figs = [...document.querySelectorAll('figure.lg-figure')];"
        "return figs.map(f => [f.querySelectorAll('.js-plotly-plot svg.main-svg')"
        ".length, f.querySelectorAll('.scatterlayer .trace').length]);"
    )
    assert len(counts) == expected
    assert all(svgs >= 1 and traces >= 1 for svgs, traces in counts), counts
    if name == "bare":  # no figure, and the page says why
        assert expected == 0
        assert "the run has no metrics yet" in driver.page_source
    shot = driver.get_screenshot_as_png()
    assert _variance(shot) > 200, "the screenshot is blank"


def test_figures_are_not_blank(driver, pages):
    from selenium.webdriver.common.by import By

    _open(driver, pages["study"])
    figures = driver.find_elements(By.CSS_SELECTOR, "figure.lg-figure")
    assert len(figures) == 10
    for fig in figures[:1] + figures[4:5]:  # a training panel, a density
        driver.execute_script("arguments[0].scrollIntoView()", fig)
        assert _variance(fig.screenshot_as_png) > 200


def test_the_browser_really_is_offline(driver):
    """The cut-off works: a page without the report's policy cannot fetch."""
    driver.get("data:text/html,<title>probe</title>")
    outcome = driver.execute_async_script(
        "const done = arguments[0];"
        "fetch('https://example.com/', {mode: 'no-cors'}).then(() => done('reached'), "
        "e => done('failed: ' + e));"
    )
    assert outcome.startswith("failed"), outcome
    driver.get_log("browser")  # the failed fetch's console line is expected here


def test_the_docs_screenshots_are_made_from_a_report(
    browser_available, pages, tmp_path
):
    saved = screenshots(pages["study"], tmp_path)
    assert [p.name for p in saved] == [
        "report_top.png",
        "report_sharpness.png",
        "report_density.png",
        "report_hypotheses.png",
    ]
    for path in saved:
        assert _variance(path.read_bytes()) > 200, path.name
