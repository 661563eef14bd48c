"""Input images on the page, in Chromium against the real app (demo model): upload, then
Generate; the strength slider and the model's note; bad uploads give a message and the page
keeps working; a result goes back in as the input (the button, or dragged from the gallery);
a model that takes no input image (the test-only "text-only-test") hides the input."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.fixtures.bad_images import BAD_IMAGES, png, noise
from tests.fixtures.text_only_model import MODEL_NAME as TEXT_ONLY_NAME

from .server import CHROMIUM, running_server
from .test_app_browser import STEP_DELAY_S, browser, gallery_count, open_page, set_value, toasts, wait_ready, wait_toast  # noqa: F401

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"LVS_TEST_STEP_DELAY_S": STEP_DELAY_S, "LVS_TEST_TEXT_ONLY_MODEL": "1"}
    with running_server(tmp_path_factory.mktemp("images"), env=env, entry=["-m", "tests.serve_app"]) as url:
        yield url


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


# ---------------------------------------------------------------- a result dragged back in
def input_count(page) -> int:
    return page.locator("#input-images img").count()


def result_src(page) -> str:
    """The served URL of the newest result (the gallery's preview of it)."""
    return page.locator("#gallery img").first.get_attribute("src")


def sha16(page, src: str) -> str:
    """The first 16 hex digits of the sha256 of the file the page shows at `src` (the infotext's)."""
    response = page.request.get(src)
    assert response.ok, response.status
    return hashlib.sha256(response.body()).hexdigest()[:16]


def drop_url(page, url: str, selector: str = "#input-images") -> None:
    """Drop a drag that carries only a URL (text/uri-list), as a browser's drag of an <img> from
    another page does, on `selector`."""
    page.evaluate(
        """([selector, url]) => {
            const target = document.querySelector(selector);
            const data = new DataTransfer();
            data.setData("text/uri-list", url);
            for (const type of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: data }));
            }
        }""",
        [selector, url],
    )


def test_a_result_dragged_from_the_gallery_is_the_input(page):
    """A real drag (Chromium's own drag data from the result's <img>: its URL, no file) onto the
    input: the input holds the result, and the next image-to-image run records its hash."""
    before = gallery_count(page)
    generate(page, "first")
    wait_image(page, before)
    src = result_src(page)
    assert "/gradio_api/file=" in src, src
    assert input_count(page) == 0
    page.locator("#gallery img").first.drag_to(page.locator("#input-images"))
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length === 1", timeout=30_000)
    expected = sha16(page, src)
    assert page.locator("#input-drop-message").count() == 0 or not page.locator("#input-drop-message").is_visible()
    generate(page, "dragged")
    page.wait_for_function("() => document.querySelector('#parameters textarea').value.startsWith('dragged')", timeout=120_000)
    wait_ready(page)
    params = page.locator("#parameters textarea").input_value()
    assert "Input images: 1" in params and f"sha256 {expected}" in params, (expected, params)
    assert f"Input image 1: 64x64 sha256 {expected}" in params, params  # the result (the demo's 64x64) at its own size


def test_a_dropped_url_from_elsewhere_is_refused_and_the_page_keeps_working(page, server):
    before = gallery_count(page)
    generate(page, "source")
    wait_image(page, before)
    drop_url(page, "https://example.com/cat.png")
    message = page.locator("#input-drop-message")
    message.wait_for(state="visible", timeout=10_000)
    assert "Only this app's own images can be dropped here" in message.inner_text() and "example.com" in message.inner_text()
    page.wait_for_timeout(500)
    assert input_count(page) == 0
    # a same-origin link that is not one of the app's files is refused too
    drop_url(page, server + "config")
    page.wait_for_function(
        "() => document.querySelector('#input-drop-message').innerText.includes('/config is not one of its files')",
        timeout=10_000,
    )
    # the page keeps working: the app's own result, dropped as a bare URL, goes in and is used
    src = result_src(page)
    drop_url(page, src)
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length === 1", timeout=30_000)
    assert not message.is_visible()
    expected = sha16(page, src)
    generate(page, "after refusal")
    page.wait_for_function("() => document.querySelector('#parameters textarea').value.startsWith('after refusal')", timeout=120_000)
    wait_ready(page)
    assert f"sha256 {expected}" in page.locator("#parameters textarea").input_value()


# ---------------------------------------------------------------- a model that takes no image
def choose_model(page, name: str) -> None:
    page.get_by_label("Model", exact=True).click()
    page.get_by_role("option", name=re.compile(re.escape(name))).click()


def test_a_model_that_takes_no_image_hides_the_input_and_keeps_the_image_aside(page, tmp_path):
    """Choosing it: the note says it takes no input image, the input, "Use result as input" and
    the strength go; an image already in the input is set aside (the note says so) and is not
    sent: Generate makes a text-to-image PNG. Choosing the demo again brings the image back."""
    path = tmp_path / "aside.png"
    path.write_bytes(png(noise(96, 64, seed=3)))
    upload(page, path)
    choose_model(page, TEXT_ONLY_NAME)
    page.wait_for_function("() => document.querySelector('#image-note').innerText.includes('takes no input image')")
    note = page.locator("#image-note").inner_text()
    assert "The 1 input image is set aside, not used" in note, note
    page.locator("#input-images").wait_for(state="hidden")
    assert not page.locator("#use-result-btn").is_visible() and not page.locator("#strength").is_visible()
    before = gallery_count(page)
    generate(page, "text only model")
    wait_image(page, before)
    params = page.locator("#parameters textarea").input_value()
    assert "Model: text-only-test" in params and "Input image" not in params, params
    assert "takes no input image" not in toasts(page)
    # back to an image-to-image model: the image set aside is the input again
    choose_model(page, "Demo (tiny Z-Image")
    page.wait_for_function("() => document.querySelector('#image-note').innerText.includes('Image-to-image')")
    page.locator("#input-images").wait_for(state="visible")
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length === 1", timeout=30_000)
    assert page.locator("#use-result-btn").is_visible() and page.locator("#strength").is_visible()
    before = gallery_count(page)
    generate(page, "image back")
    wait_image(page, before)
    params = page.locator("#parameters textarea").input_value()
    assert "Input images: 1" in params and "Input image 1: 96x64" in params, params


def test_a_file_dropped_on_an_input_that_holds_images_is_added(page, tmp_path):
    """Gradio's drop zone is there only while the input is empty; a file dropped on the images
    already in it goes through the same upload (ui/drop_results.js)."""
    import base64

    path = tmp_path / "first.png"
    path.write_bytes(png(noise(64, 64, seed=1)))
    upload(page, path)
    second = base64.b64encode(png(noise(64, 64, seed=2))).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "second.png", { type: "image/png" }));
            const target = document.querySelector("#input-images img");
            for (const type of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: data }));
            }
        }""",
        second,
    )
    page.wait_for_function("() => document.querySelectorAll('#input-images img').length === 2", timeout=30_000)
    generate(page)
    wait_toast(page, "at most 1 input image; got 2")  # the demo takes one: the usual message
    wait_ready(page)
