"""The explorer page (GET /) and the API browser (GET /docs) in a real browser against a real pc-serve.

Debian's chromium (/usr/bin/chromium, installed by .ci/run) driven by playwright; `playwright install`
is never needed. Every request a page makes must go to the server itself. Set PC_EXPLORER_SCREENSHOT
to a path to save the page with a photo encoded (docs/figures/explorer.png is made this way).
wait_for_function takes functions ("() => ..."), not expressions: Playwright evaluates an expression
with eval(), which the page's Content-Security-Policy refuses.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import pcmodel
from pcmodel.images import sample_photo

from .conftest import Server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# As root chromium needs --no-sandbox; the rest keep it from calling home (updates, sync, field trials).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page that records every request it makes and every console error (a CSP violation is one)."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1120, "height": 900})
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))
        self.url = url

    def elsewhere(self) -> list[str]:
        """Requests that went anywhere but this server (data: URLs and this server's blob: URLs are the page's
        own bytes, not requests)."""
        own = (self.url + "/", "data:", f"blob:{self.url}/")
        return [u for u in self.requests if not u.startswith(own)]


def test_explorer_encodes_a_photo_and_shows_api_errors(server, browser, tmp_path):
    photo = tmp_path / "photo.png"
    pixels = sample_photo()
    photo_side = pixels.shape[0]
    assert pixels.shape[:2] == (photo_side, photo_side) and photo_side % 32 == 0
    Image.fromarray(pixels).save(photo)
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file, not a photo\n")
    watched = Watched(browser, server.url)
    page = watched.page

    response = page.goto(server.url + "/")
    assert response is not None and response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    page.wait_for_selector("#card tr")  # the model card has arrived
    page.wait_for_function("() => document.getElementById('basis').naturalWidth > 0")
    levels = pcmodel.load("default").config
    per_level = ", ".join(f"{levels.k1 * lv.k1_scale:.3g}" for lv in levels.levels)
    assert f"(per level: {per_level})" in page.inner_text("#card")  # conv-rgb steps each level at its own rate

    page.set_input_files("#image", str(photo))
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    for map_id in ("input-map", "reconstruction-map", "error-map"):
        size = page.eval_on_selector(f"#{map_id}", "img => [img.naturalWidth, img.width]")
        assert size[0] == photo_side and size[1] >= 256, (map_id, size)  # full mode, conv-rgb's default: whole
    config = pcmodel.load("default").config
    canvases = page.locator("#latents .level")
    assert canvases.count() == len(config.levels)
    for index, level in enumerate(config.levels):
        assert canvases.nth(index).locator("canvas").count() == level.causes
    errors = page.locator("#level-errors .level")  # each level's prediction error, per channel of the map below
    assert errors.count() == len(config.levels)
    channels = [config.input_shape[0], *(level.causes for level in config.levels[:-1])]
    for index, count in enumerate(channels):
        assert errors.nth(index).locator("canvas").count() == count
    points = page.get_attribute("#energy-plot polyline.trace", "points")
    assert points is not None and len(points.split()) == config.steps + 1  # the trace, one point per step
    assert "lower" in page.inner_text("#summary")
    if path := os.environ.get("PC_EXPLORER_SCREENSHOT"):
        page.screenshot(path=path, full_page=True)

    assert page.eval_on_selector_all("#solver option", "o => o.map(x => x.value)") == list(pcmodel.SOLVERS)
    assert "dynamics" in page.inner_text("#summary")
    page.fill("#steps", "20")  # again, with other options: the plot follows
    page.select_option("#solver", "nesterov")
    page.click("#encode")
    page.wait_for_function("() => document.querySelector('#energy-plot polyline.trace').points.length === 21")
    # fast and slow: the paper's dynamics from zero drawn beside the run, for the same photo
    page.wait_for_function("() => document.querySelector('#energy-plot polyline.paper') !== null")
    assert len(page.get_attribute("#energy-plot polyline.paper", "points").split()) == 100 + 1
    assert "nesterov" in page.inner_text("#summary")
    page.wait_for_function("() => !document.getElementById('encode').disabled")
    # step through inference: a slider over the states of this run (20 steps: 21 states from the start)
    page.click("#step-through")
    page.wait_for_selector("#snapshot-box:not([hidden])", timeout=60_000)
    assert page.get_attribute("#snapshot", "max") == "20" and "step 20 of 20" in page.inner_text("#snapshot-label")
    final = page.get_attribute("#reconstruction-map", "src")
    page.fill("#snapshot", "2")  # a range input takes fill; it fires input
    page.wait_for_function("() => document.getElementById('snapshot-label').innerText.startsWith('step 2 of 20')")
    page.wait_for_function(f"() => document.getElementById('reconstruction-map').src !== {final!r}")
    page.select_option("#solver", "gradient")

    # Tile mode: tiles overlap by half; the latent maps show the tiles on the image's own tile-sized grid.
    page.select_option("#size-mode", "tile")
    page.click("#encode")
    page.wait_for_function("() => document.getElementById('summary').innerText.includes('tiles')")
    page.wait_for_function("() => !document.getElementById('encode').disabled")
    side = photo_side // 32  # the photo is photo_side x photo_side, conv-rgb's tiles 32 x 32
    width = page.eval_on_selector("#latents .level canvas", "c => c.width")
    assert width == side * 7, width  # level 1: 7 positions per tile, side tiles across, none repeated

    page.set_input_files("#image", str(notes))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    expected = httpx.post(server.url + "/encode", files={"image": ("notes.txt", notes.read_bytes())}, timeout=60)
    assert expected.status_code == 400
    assert page.inner_text("#error") == expected.json()["error"]
    assert page.get_attribute("#error", "data-reason") == "bad_image"

    assert watched.requests and not watched.elsewhere(), watched.elsewhere()
    # The failed /encode logs "400 (Bad Request)" to the console; nothing else may (a CSP violation would).
    assert [e for e in watched.console_errors if "400" not in e] == []
    page.close()


def test_api_browser_loads_nothing_from_elsewhere(server, browser):
    watched = Watched(browser, server.url)
    response = watched.page.goto(server.url + "/docs")
    assert response is not None and response.status == 200
    watched.page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)  # the operations are listed
    assert "/encode" in watched.page.inner_text(".swagger-ui")
    assert not watched.elsewhere(), watched.elsewhere()
    assert watched.console_errors == []
    assert "://" not in server.get("/docs.json").text  # no badge or link the page would fetch
    watched.page.close()


def test_pages_and_basis_over_http(server):
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self' covers scripts
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline
    assert server.get("/static/explorer.js").headers["content-type"].startswith("text/javascript")
    assert server.get("/static/../service.py").status_code == 404
    basis = server.get("/model/basis")
    assert basis.status_code == 200 and basis.headers["content-type"] == "image/png"
    grid = np.asarray(Image.open(io.BytesIO(basis.content)))
    fields = pcmodel.load("default").receptive_fields(1).numpy()  # (8, 3, 8, 8): 3 x 3 fields, 1-pixel gaps
    assert fields.shape == (8, 3, 8, 8) and grid.shape == (3 * 8 + 2, 3 * 8 + 2, 3)
    for i, field in enumerate(fields):  # each on its own scale: zero at mid-grey, its peak at 0 or 255
        top, left = (i // 3) * 9, (i % 3) * 9
        expected = (field / np.abs(field).max() + 1) * 127.5
        np.testing.assert_allclose(grid[top : top + 8, left : left + 8], expected.transpose(1, 2, 0), atol=0.51)
    assert (grid[8, :] == 255).all() and (grid[:, 8] == 255).all()  # the gaps


def test_pc_serve_prints_where_it_is_ready(server):
    line = f"pc-serve: ready at {server.url}/ (explorer page; API at /encode)"
    deadline = time.monotonic() + 5  # the supervisor sees the ready report within its 0.2 s poll
    while line not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log.read_text().count(line) == 1


def test_explorer_asks_for_the_api_key_once(guarded_server, browser, tmp_path):
    """With PC_API_KEY the page asks once, keeps the key for the tab (sessionStorage) and sends it with every
    request: the model card, the basis (fetched, shown from a blob: URL) and /encode."""
    from .conftest import API_KEY

    photo = tmp_path / "small.png"
    Image.fromarray(sample_photo()).resize((64, 64)).save(photo)  # under this server's 100 kB body limit
    watched = Watched(browser, guarded_server.url)
    page = watched.page
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(API_KEY)

    page.on("dialog", answer)
    page.goto(guarded_server.url + "/")
    page.wait_for_selector("#card tr")
    page.wait_for_function("() => document.getElementById('basis').naturalWidth > 0")
    assert len(asked) == 1 and "API key" in asked[0]
    assert page.evaluate("() => sessionStorage.getItem('pc-api-key')") == API_KEY
    page.set_input_files("#image", str(photo))
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    page.reload()  # the same tab keeps the key: no second question
    page.wait_for_selector("#card tr")
    assert len(asked) == 1
    assert not watched.elsewhere(), watched.elsewhere()
    # Only the first, keyless request was refused (the browser logs its 401).
    assert [e for e in watched.console_errors if "401" not in e] == []
    page.close()


def test_the_latest_photo_wins_and_the_stepper_asks_what_ran(server, browser, tmp_path):
    """A slow request (tile mode, 400 steps) then at once a quick one (resize, 5 steps): the quick answer is
    shown and the slow one, arriving later, is dropped (it had been drawn over the newer photo, with the newer
    name in the status). The stepper then asks with the options of the run shown, whatever the form says by
    then. Large energies read as digits, not exponents."""
    slow, quick = tmp_path / "slow.png", tmp_path / "quick.png"
    Image.fromarray(sample_photo()).save(slow)
    Image.fromarray(sample_photo()[:96, :64]).save(quick)
    page = Watched(browser, server.url).page
    page.goto(server.url + "/")
    page.wait_for_selector("#card tr")
    finished: list[str] = []
    page.on(
        "requestfinished", lambda request: finished.append(request.url) if request.url.endswith("/encode") else None
    )
    page.select_option("#size-mode", "tile")
    page.fill("#steps", "400")
    page.set_input_files("#image", str(slow))
    page.select_option("#size-mode", "resize")
    page.fill("#steps", "5")
    page.set_input_files("#image", str(quick))
    page.wait_for_function("() => document.getElementById('status').innerText.startsWith('Encoded quick.png')")
    deadline = time.monotonic() + 120
    while len(finished) < 3:  # the quick one, its paper's dynamics, and the slow one (the last to finish)
        assert time.monotonic() < deadline, "the slow request never finished"
        page.wait_for_timeout(200)
    page.wait_for_timeout(500)  # and has had its chance to be drawn: it must change nothing
    summary = page.inner_text("#summary")
    assert "resize" in summary and "tiles" not in summary and "Encoded quick.png" in page.inner_text("#status")
    assert "e+" not in summary
    page.fill("#steps", "7")  # the form changes; the stepper still asks for the run shown (5 steps)
    page.wait_for_function("() => !document.getElementById('step-through').disabled")
    page.click("#step-through")
    page.wait_for_selector("#snapshot-box:not([hidden])", timeout=60_000)
    assert "step 5 of 5" in page.inner_text("#snapshot-label")
    page.close()


def phone_page_shows(browser, url: str, photo: Path, size_mode: str):
    """A 375 px wide page that has encoded `photo`; asserts the energy plot is drawn at its box's width (not a
    640-wide picture scaled down), no picture's text is under 10 px and the page does not scroll sideways."""
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(url + "/")
    page.wait_for_selector("#card tr")
    page.select_option("#size-mode", size_mode)
    page.set_input_files("#image", str(photo))
    page.wait_for_function(f"() => document.getElementById('summary').innerText.includes('{size_mode}')")
    page.wait_for_function("() => !document.getElementById('encode').disabled")
    page.wait_for_timeout(300)  # the resize observer's redraw
    scale = page.eval_on_selector("#energy-svg", "s => s.getBoundingClientRect().width / s.viewBox.baseVal.width")
    assert 0.97 <= scale <= 1.03, scale
    heights = page.eval_on_selector_all("#results svg text", "ts => ts.map(t => t.getBoundingClientRect().height)")
    assert heights and min(heights) >= 10, heights
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    return page


def test_on_a_phone_the_plots_keep_their_text_size_and_nothing_overflows(server, browser, tmp_path):
    """The energy plot's labels had shrunk to ~6 px on a phone, and rao-ballard-1999's cause bars (900 px wide)
    ran off the page with a 4 px caption."""
    photo = tmp_path / "photo.png"
    Image.fromarray(sample_photo()).save(photo)
    phone_page_shows(browser, server.url, photo, "full").close()
    with Server(tmp_path / "rao", model="rao-ballard-1999", access_log=False) as rao:
        page = phone_page_shows(browser, rao.url, photo, "resize")
        assert page.locator(".bars-caption").count() >= 1  # a dense level: one bar per cause, captioned
        widths = page.eval_on_selector_all("svg.bars", "ss => ss.map(s => s.getBoundingClientRect().width)")
        assert widths and max(widths) <= 375, widths
        page.close()
