"""Input images on the page, in Chromium against the real app (demo model): upload, then
Generate; the strength slider and the model's note; bad uploads give a message and the page
keeps working; a result goes back in as the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.bad_images import BAD_IMAGES, png, noise

from .server import CHROMIUM
from .test_app_browser import browser, gallery_count, open_page, server, set_value, toasts, wait_ready, wait_toast  # noqa: F401

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]


@pytest.fixture
def page(browser, server):  # noqa: F811
    p = open_page(browser, server)
    yield p
    p.context.close()


def upload(page, path: Path) -> None:
    page.locator("#input-images input[type=file]").set_input_files(str(path))
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length >= 1", timeout=30_000)


def generate(page, prompt: str = "a cat", steps: int = 2) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    set_value(page, "number input for Steps", steps)
    page.locator("#generate-btn").click()


def wait_image(page, before: int) -> None:
    """A new image in the results, then the button is back."""
    page.wait_for_function(f"() => document.querySelectorAll('#gallery img').length > {before}", timeout=120_000)
    wait_ready(page)


def test_upload_then_generate_is_image_to_image(page, tmp_path):
    assert page.locator("#strength").is_visible()
    assert "Image-to-image" in page.locator("#image-note").inner_text()
    path = tmp_path / "in.png"
    path.write_bytes(png(noise(150, 100)))
    upload(page, path)
    before = gallery_count(page)
    generate(page)
    wait_image(page, before)
    params = page.locator("#parameters textarea").input_value()
    assert "Input images: 1" in params and "Denoising strength: 0.6" in params and "Size: 144x96" in params, params
    wait_toast(page, "resized to 144x96")
    # the result goes back in as the input
    page.locator("#use-result-btn").click()
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length === 1")
    generate(page, "again")
    page.wait_for_function("() => document.querySelector('#parameters textarea').value.startsWith('again')", timeout=120_000)
    wait_ready(page)
    params = page.locator("#parameters textarea").input_value()
    assert "Input image 1: 144x96 sha256" in params, params  # the result itself, at its own size


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_a_bad_upload_is_a_message_and_the_page_keeps_working(page, tmp_path, name):
    data, message = BAD_IMAGES[name]
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    page.locator("#input-images input[type=file]").set_input_files(str(path))
    page.wait_for_timeout(1500)  # the upload (a broken file may show no thumbnail)
    generate(page)
    wait_toast(page, message)
    wait_ready(page)
    # clear the input and generate from text
    page.reload()
    page.wait_for_selector("#generate-btn")
    before = gallery_count(page)
    generate(page, "text only")
    wait_image(page, before)


def test_too_many_images_and_converted_modes(page, tmp_path):
    """Two images for the demo (it takes one): a message; then a CMYK JPEG is converted, with a note."""
    from tests.fixtures.bad_images import CONVERTED_IMAGES

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.png")
        paths[-1].write_bytes(png(noise(64, 64, seed=i)))
    page.locator("#input-images input[type=file]").set_input_files([str(p) for p in paths])
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length >= 2", timeout=30_000)
    generate(page)
    wait_toast(page, "at most 1 input image; got 2")
    wait_ready(page)
    page.reload()
    page.wait_for_selector("#generate-btn")
    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(CONVERTED_IMAGES["cmyk"][0])
    upload(page, cmyk)
    before = gallery_count(page)
    generate(page)
    wait_image(page, before)
    wait_toast(page, "CMYK")
