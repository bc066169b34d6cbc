"""The page at / in a real browser: Debian's chromium driven by Playwright against the real
server (uvicorn, loopback). Uploads an image, waits for the overlay and the legend, moves the
opacity slider, opens the model panel and the comparison tab, runs a short video, on a desktop
and on a phone-sized screen, and saves screenshots (to $SEGFORMER_SCREENSHOTS if set).

Skipped with a reason when Playwright or chromium is missing. Never runs `playwright install`:
it drives the system chromium.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.server.helpers import BENCH_SAMPLE, make_settings, serving, video_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def street_scene(width: int = 320, height: int = 200) -> bytes:
    """A picture with a sky, a horizon of buildings and a road, so the page has shapes to show."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    sky = y < height * 0.45
    image[sky] = np.stack([120 + y[sky] // 3, 170 + y[sky] // 4, 235 - y[sky] // 5], axis=-1).clip(
        0, 255
    )
    buildings = (~sky) & (y < height * 0.62) & ((x // 37) % 3 != 1)
    image[buildings] = (90, 84, 80)
    image[(~sky) & ~buildings & (y < height * 0.62)] = (70, 120, 60)
    road = y >= height * 0.62
    image[road] = (105, 105, 110)
    image[road & (np.abs(x - width // 2) < 3) & ((y // 8) % 2 == 0)] = (240, 240, 240)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@dataclass
class Site:
    url: str
    bench_results: Path  # where the server looks for `segformer bench` results


@pytest.fixture(scope="module")
def site(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = make_settings(model_dir, tmp_path_factory.mktemp("browser"))
    with serving(settings) as live:
        yield Site(live.url, settings.bench_results)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SEGFORMER_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_in_page(page, predicate: str, arg=None, timeout: float = 10.0) -> None:
    """Poll a JavaScript predicate from the test side until it is true. (Playwright's
    ``wait_for_function`` polls with ``eval`` inside the page, which the app's
    Content-Security-Policy forbids, so it fails whenever the first check is false.)"""
    deadline = time.monotonic() + timeout
    while not (page.evaluate(predicate) if arg is None else page.evaluate(predicate, arg)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {predicate}")
        page.wait_for_timeout(50)


def open_page(browser, site: Site, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.goto(site.url + "/")
    wait_in_page(page, "document.body.dataset.ready === 'ok'")
    return page, errors


def overlay_pixel(page) -> list[int]:
    return page.evaluate(
        """() => {
            const c = document.querySelector('#overlay-canvas');
            return Array.from(c.getContext('2d').getImageData(c.width >> 1, c.height - 5, 1, 1).data);
        }"""
    )


@pytest.mark.parametrize(
    ("device", "width", "height"), [("desktop", 1280, 800), ("phone", 390, 844)]
)
def test_upload_image_shows_overlay_and_legend(
    browser, site, screenshots, tmp_path, device, width, height
) -> None:
    photo = tmp_path / "street.jpg"
    photo.write_bytes(street_scene())
    page, errors = open_page(browser, site, width, height)
    assert "megapixels" in page.text_content("#image-limits")

    page.set_input_files("#image-input", str(photo))
    page.wait_for_selector("#legend li", timeout=20_000)
    wait_in_page(page, "document.querySelector('#image-busy').hidden")
    names = page.locator("#legend .name").all_text_contents()
    assert names and set(names) <= {"background", "thing", "stuff"}
    shares = [
        float(s.rstrip("%").lstrip("<")) for s in page.locator("#legend .share").all_text_contents()
    ]
    assert shares == sorted(shares, reverse=True) and 99 <= sum(shares) <= 101
    assert page.text_content("#stat-time").endswith(("ms", "s"))
    assert page.text_content("#stat-size") == "320 × 200"
    assert page.eval_on_selector("#overlay-canvas", "c => [c.width, c.height]") == [320, 200]

    # the slider re-blends in the page, with no new request
    api_calls: list[str] = []
    page.on("request", lambda request: "/v1/" in request.url and api_calls.append(request.url))
    before = overlay_pixel(page)
    page.fill("#opacity", "100")
    wait_in_page(
        page,
        """before => {
            const c = document.querySelector('#overlay-canvas');
            const now = c.getContext('2d').getImageData(c.width >> 1, c.height - 5, 1, 1).data;
            return Array.from(now).some((v, i) => v !== before[i]);
        }""",
        arg=before,
        timeout=5.0,
    )
    page.fill("#opacity", "55")
    assert not api_calls

    # nothing sticks out sideways, even on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.screenshot(path=str(screenshots / f"image_{device}.png"), full_page=True)

    page.click("#about-open")
    page.wait_for_selector("#about-body .chip")
    assert page.locator("#about-body .chip").count() == 3
    assert "apache-2.0" in page.text_content("#about-body")
    page.screenshot(path=str(screenshots / f"about_{device}.png"))
    page.click("#about-close")

    page.click("#tab-compare")
    page.wait_for_selector("#bench-chart .empty")
    assert "No benchmark results yet" in page.text_content("#bench-chart")
    assert not errors, errors
    page.close()


def test_video_plays_after_processing(browser, site, screenshots, tmp_path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_bytes(4, 96, 64))
    page, errors = open_page(browser, site, 1280, 800)
    page.click("#tab-video")
    page.set_input_files("#video-input", str(clip))
    page.wait_for_selector("#video-result:not([hidden])", timeout=30_000)
    source = page.get_attribute("#video-player", "src")
    assert source and "/v1/videos/" in source
    assert page.get_attribute("#video-download", "href").endswith("/result?download=true")
    page.wait_for_selector("#video-chart svg polyline")
    assert "4 at 10 fps" in page.text_content("#video-facts")
    page.screenshot(path=str(screenshots / "video_desktop.png"), full_page=True)
    assert not errors, errors
    page.close()


def test_comparison_chart(browser, site, screenshots) -> None:
    page, errors = open_page(browser, site, 1280, 800)
    page.click("#tab-compare")
    page.wait_for_selector("#bench-chart .empty")  # no results file yet: a friendly empty state
    assert "segformer bench" in page.text_content("#bench-chart")

    results = site.bench_results
    results.write_text(json.dumps(BENCH_SAMPLE), encoding="utf-8")
    page.reload()
    page.click("#tab-compare")
    page.wait_for_selector("#bench-chart svg rect")
    assert page.locator("#bench-chart svg rect").count() == 5  # one bar per engine and job
    chart = page.text_content("#bench-chart")
    assert "b0 512×512" in chart and "compiled bf16" in chart and "0.21×" in chart
    assert page.locator("#bench-table-wrap tbody tr").count() == 5
    assert "Test CPU" in page.text_content("#bench-machine")
    page.screenshot(path=str(screenshots / "compare_desktop.png"), full_page=True)
    results.unlink()
    assert not errors, errors
    page.close()


@pytest.mark.parametrize(
    ("device", "width", "height"), [("desktop", 1280, 800), ("phone", 390, 844)]
)
def test_model_domain_and_out_of_domain_notice(
    browser,
    model_dir: Path,
    tmp_path: Path,
    screenshots: Path,
    device: str,
    width: int,
    height: int,
) -> None:
    import segformer

    # The tiny model, saying what it is for, with a threshold every picture is above.
    model = segformer.load(model_dir)
    model.metadata.domain = "test pictures of streets"
    model.metadata.out_of_domain = {"score": "energy", "threshold": -1e9}
    folder = segformer.save(model, tmp_path / "flagging")
    settings = make_settings(model_dir, tmp_path, models=[f"flagging={folder}"])
    photo = tmp_path / "street.jpg"
    photo.write_bytes(street_scene())
    with serving(settings) as live:
        page, errors = open_page(browser, Site(live.url, settings.bench_results), width, height)
        if device == "desktop":  # beside the picker; on a phone only in the About panel
            assert page.is_visible("#model-domain")
            assert page.text_content("#model-domain") == "for test pictures of streets"
        assert page.is_hidden("#ood-notice")
        page.set_input_files("#image-input", str(photo))
        page.wait_for_selector("#legend li", timeout=20_000)
        assert page.is_visible("#ood-notice")
        notice = page.text_content("#ood-notice")
        assert "does not look like what the model was trained on" in notice
        assert "(test pictures of streets)" in notice
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(screenshots / f"out_of_domain_{device}.png"), full_page=True)
        page.click("#about-open")
        page.wait_for_selector("#about-body .chip")
        assert "Made for" in page.text_content("#about-body")
        assert "test pictures of streets" in page.text_content("#about-body")
        assert not errors, errors
        page.close()
