"""The search page in a real headless Chromium, served by `captioner serve` as a user starts it.

The index comes from the real pipeline (embedded local Ray, the tiny models)
over the example photos, built with `captioner index`; the server is the
`captioner serve` command in a subprocess on a free loopback port. The test
types a query, sees thumbnails, opens one, sees its caption and every probe
answer, clicks "more like this", and searches by an uploaded image.

Screenshots of the result page and the image view are saved under
$CAPTIONER_SCREENSHOT_DIR (default: the test's temporary folder).

Needs Debian's chromium and chromium-driver (apt-get install -y chromium
chromium-driver); skipped, saying so, when they are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.serve_support import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EXAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="the page test needs Chromium and its driver: apt-get install -y chromium chromium-driver",
    ),
    pytest.mark.subprocess,  # the page's server and the browser are processes of their own
]


@pytest.fixture(scope="module")
def pipeline_index(tmp_path_factory, tiny_vlm_dir, tiny_clip_dir, ray_module):
    """examples/photos -> `captioner run` (tiny models, default probes, the shared Ray) -> `captioner index`."""
    from pipeline.cli import main

    folder = tmp_path_factory.mktemp("serve_page")
    shutil.copytree(EXAMPLE_PHOTOS, folder / "photos")
    out = folder / "captions.parquet"
    args = [
        "run", str(folder / "photos"), "--out", str(out), "--no-progress", "--device", "cpu",
        "--caption-model", str(tiny_vlm_dir), "--embed-model", f"open_clip:{tiny_clip_dir}",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    db = folder / "index.duckdb"
    result = CliRunner().invoke(main, ["index", str(out), "--db", str(db)])
    assert result.exit_code == 0, result.output
    return db, out


@pytest.fixture(scope="module")
def server(pipeline_index, tmp_path_factory):
    """`captioner serve --index ... --port P` in a subprocess, as a user runs it."""
    db, _ = pipeline_index
    port = free_port()
    script = Path(sys.executable).with_name("captioner")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [*command, "serve", "--index", str(db), "--port", str(port), "--device", "cpu"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/info", timeout=2) as response:
                    json.load(response)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"captioner serve did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "warning" not in log.read_text().lower(), log.read_text()  # loopback by default: no exposure warning


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,900",
                "--force-device-scale-factor=1", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CAPTIONER_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver, condition, timeout=20, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message)


# read in one go: the grid may be replaced between two WebDriver calls
CARD_TITLES = "return [...document.querySelectorAll('.card')].map(c => c.title);"


def _images_loaded(driver, selector) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
        selector,
    )


def test_search_open_an_image_and_more_like_this(server, browser, pipeline_index, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, parquet = pipeline_index
    rows = {r["uri"]: r for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok"}
    # the tiny captioner writes random words: search for a word of one caption
    target = sorted(rows)[0]
    word = max(rows[target]["caption"].split(), key=len)

    browser.get(server + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "facts").text, message="the page did not load /api/info")
    assert "searchable images" in browser.find_element(By.ID, "facts").text
    # probe filters come from the index's own probe set
    legends = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".probe-filter legend")]
    assert legends == [p["question"] for p in rows[target]["probes"]]

    # type a query (the search box has focus on load), Enter searches in hybrid mode
    box = browser.switch_to.active_element
    assert box.get_attribute("id") == "q"
    box.send_keys(word, Keys.ENTER)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"), message="no results appeared")
    _wait(browser, lambda d: _images_loaded(d, ".card img"), message="thumbnails did not load")
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert "hybrid" in browser.find_element(By.ID, "status").text
    assert cards[0].find_element(By.CSS_SELECTOR, ".rank").text == "#1"
    assert float(cards[0].find_element(By.CSS_SELECTOR, ".score").text) > 0
    uris = [c.get_attribute("title") for c in cards]
    assert target in uris and set(uris) <= set(rows)
    # thumbnails are real JPEGs made from the originals, not the placeholder
    kinds = browser.execute_script(
        "return Promise.all([...document.querySelectorAll('.card img')].map("
        "i => fetch(i.src).then(r => r.headers.get('content-type'))));"
    )
    assert set(kinds) == {"image/jpeg"}
    browser.save_screenshot(str(screenshots / "serve-results.png"))

    # open the target: its full caption and every probe answer
    cards[uris.index(target)].click()
    viewer = browser.find_element(By.ID, "viewer")
    _wait(browser, lambda d: viewer.is_displayed() and d.find_element(By.ID, "viewer-caption").text == rows[target]["caption"],
          message="the image view did not show the caption")  # fmt: skip
    probe_rows = browser.find_elements(By.CSS_SELECTOR, "#viewer-probes tbody tr")
    shown = [tuple(td.text for td in tr.find_elements(By.TAG_NAME, "td")) for tr in probe_rows]
    assert shown == [(p["question"], p["answer"]) for p in rows[target]["probes"]]
    facts = browser.find_element(By.ID, "viewer-facts").text
    assert target in facts and f"{rows[target]['width']} × {rows[target]['height']}" in facts
    _wait(browser, lambda d: _images_loaded(d, "#viewer-img"), message="the preview did not load")
    browser.save_screenshot(str(screenshots / "serve-image-view.png"))

    # more like this: the image itself comes first, at cosine 1
    browser.find_element(By.ID, "viewer-like").click()
    _wait(browser, lambda d: not viewer.is_displayed() and d.find_element(By.ID, "source-banner").is_displayed())
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card") and "like" in d.find_element(By.ID, "status").text)
    first = browser.find_element(By.CSS_SELECTOR, ".card")
    assert first.get_attribute("title") == target
    assert first.find_element(By.CSS_SELECTOR, ".score").text == "1.000"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".card")) == len(rows)

    # keyboard: focus is on the first result; arrows move, Enter opens, Escape closes
    assert browser.switch_to.active_element == first
    first.send_keys(Keys.ARROW_RIGHT)
    second = browser.switch_to.active_element
    assert second.get_attribute("data-index") == "1"
    second.send_keys(Keys.ENTER)
    _wait(browser, lambda d: viewer.is_displayed())
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    _wait(browser, lambda d: not viewer.is_displayed())

    # a probe filter re-runs the search: every result then has that answer
    from selenium.webdriver.support.ui import Select

    probe = rows[target]["probes"][0]
    box = browser.find_element(By.CSS_SELECTOR, ".probe-filter")
    if box.get_attribute("data-kind") == "bool":
        value = "yes" if probe["answer_bool"] else "no"
        box.find_element(By.CSS_SELECTOR, f"input[value='{value}'] + span").click()
        expected = sorted(u for u, r in rows.items() if r["probes"][0]["answer_bool"] is probe["answer_bool"])
    else:  # an open question: the tiny captioner's answers are random words
        value = probe["answer"].strip().lower()
        Select(box.find_element(By.TAG_NAME, "select")).select_by_value(value)
        expected = sorted(u for u, r in rows.items() if r["probes"][0]["answer"].strip().lower() == value)
    _wait(browser, lambda d: sorted(d.execute_script(CARD_TITLES)) == expected,
          message=f"the filter {probe['question']}={value} did not narrow the results to {expected}")  # fmt: skip


def test_search_by_an_uploaded_image_finds_that_image(server, browser, pipeline_index):
    """The file picker takes the same path as a dropped file (drag and drop sends the same request)."""
    from selenium.webdriver.common.by import By

    _, parquet = pipeline_index
    ok = sorted(r["uri"] for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok")
    query = ok[-1]
    browser.get(server + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "facts").text)
    browser.find_element(By.ID, "file").send_keys(query)
    _wait(browser, lambda d: d.find_element(By.ID, "source-banner").is_displayed())
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card") and "dropped image" in d.find_element(By.ID, "status").text)
    first = browser.find_element(By.CSS_SELECTOR, ".card")
    assert first.get_attribute("title") == query
    assert float(first.find_element(By.CSS_SELECTOR, ".score").text) == pytest.approx(1.0, abs=2e-3)

    # drag and drop: the page's own drop handler, fed a real File through DragEvents
    dropped = browser.execute_script(
        """
        return (async (url) => {
        const blob = await (await fetch(url)).blob();
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], "dropped.jpg", {type: blob.type}));
        const fire = (type) => document.body.dispatchEvent(
            new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        fire("dragenter");
        fire("dragover");
        const shown = !document.getElementById("drop-zone").hidden;
        fire("drop");
        return [shown, document.getElementById("drop-zone").hidden];
        })(arguments[0]);
        """,
        first.find_element(By.TAG_NAME, "img").get_attribute("src").replace("size=s", "size=l"),
    )
    assert dropped == [True, True]  # the drop zone showed while dragging, and went away on drop
    _wait(browser, lambda d: "dropped.jpg" in d.find_element(By.ID, "source-text").text)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card") and "dropped image" in d.find_element(By.ID, "status").text)


def test_the_page_says_when_the_server_reopened_a_rebuilt_index(server, browser, pipeline_index):
    """Issue 14 item 8: `captioner index` rebuilds the served --db; a search after that says the index refreshed.

    Last in this module: it replaces the index the other tests search.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from pipeline.cli import main

    db, parquet = pipeline_index
    rows = [r for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok"]
    word = max(rows[0]["caption"].split(), key=len)
    browser.get(server + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "facts").text)
    box = browser.find_element(By.ID, "q")
    box.send_keys(word, Keys.ENTER)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"), message="no results appeared")
    assert not browser.find_element(By.ID, "refreshed").is_displayed()

    result = CliRunner().invoke(main, ["index", str(parquet), "--db", str(db), "--fresh"])  # a new file renamed over it
    assert result.exit_code == 0, result.output
    # The server looks at the file at most once a second and reopens it in the
    # background: the search that notices still gets the old index, a later one the new.
    deadline = time.monotonic() + 15
    while not browser.find_element(By.ID, "refreshed").is_displayed():
        assert time.monotonic() < deadline, "the page never said the index refreshed"
        browser.find_element(By.ID, "q").send_keys(Keys.ENTER)
        time.sleep(0.5)
    notice = browser.find_element(By.ID, "refreshed").text
    assert notice == f"index refreshed: {len(rows):,} images", notice
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"), message="no results from the rebuilt index")
