"""/generate with input images through gradio_client against the running app (demo model):
`image` (one file or a list) and `strength`, the inputs in the PNG's infotext, and every bad
input a readable error after which the app keeps serving. The server also offers the test-only
"text-only-test" (tests/fixtures/text_only_model.py), a model that takes no input image."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.generation.studio import parse_infotext
from tests.fixtures.bad_images import BAD_IMAGES, CONVERTED_IMAGES, good, noise, png
from tests.fixtures.text_only_model import MODEL_ID as TEXT_ONLY, MODEL_NAME as TEXT_ONLY_NAME

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.browser.server import running_server

    tmp = tmp_path_factory.mktemp("api-images")
    with running_server(tmp, env={"LVS_TEST_TEXT_ONLY_MODEL": "1"}, entry=["-m", "tests.serve_app"]) as url:
        yield url, tmp


@pytest.fixture(scope="module")
def client(server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server[0], verbose=False, download_files=str(server[1] / "downloads"))


@pytest.fixture(scope="module")
def files(server):
    folder = server[1] / "inputs"
    folder.mkdir()

    def write(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        return str(path)

    return write


def test_image_and_strength_make_an_image_to_image_png(client, files):
    from gradio_client import handle_file
    from PIL import Image

    path = files("cat.png", png(noise(150, 100)))
    image_path, parameters = client.predict("a cat", image=handle_file(path), strength=0.5, steps=2, seed=7, api_name="/generate")
    info = parse_infotext(parameters)
    assert info["Size"] == "144x96" and info["Denoising strength"] == "0.5"
    assert info["Input image 1"].startswith("150x100 resized to 144x96 sha256 ")
    with Image.open(image_path) as im:
        assert im.size == (144, 96) and im.info["parameters"] == parameters
    # a list works too, and the same seed gives the same image
    again, _ = client.predict("a cat", image=[handle_file(path)], strength=0.5, steps=2, seed=7, api_name="/generate")
    assert Path(again).read_bytes() != b"" and Image.open(again).tobytes() == Image.open(image_path).tobytes()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_readable_errors_and_the_app_keeps_serving(client, files, name):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    data, message = BAD_IMAGES[name]
    with pytest.raises(AppError) as exc:
        client.predict("a cat", image=handle_file(files(f"{name}.png", data)), steps=1, api_name="/generate")
    assert message in str(exc.value) and "Traceback" not in str(exc.value)
    image_path, _ = client.predict("still serving", steps=1, api_name="/generate")
    assert Path(image_path).is_file()


@pytest.mark.parametrize("name", sorted(CONVERTED_IMAGES))
def test_odd_modes_are_converted(client, files, name):
    from gradio_client import handle_file

    data, _ = CONVERTED_IMAGES[name]
    image_path, parameters = client.predict("a cat", image=handle_file(files(f"{name}.img", data)), steps=2, api_name="/generate")
    assert Path(image_path).is_file() and "Input images: 1" in parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": 1.5}, "strength must be a number from 0"),
        ({"strength": "lots"}, "strength must be a number from 0"),
        ({"two_images": True}, "at most 1 input image; got 2"),
        ({"no_image": True, "strength": 0.5}, "give an input image"),
    ],
)
def test_bad_strength_and_counts(client, files, kwargs, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path = handle_file(files("ok.png", good()))
    image = None if kwargs.pop("no_image", False) else [path, path] if kwargs.pop("two_images", False) else path
    with pytest.raises(AppError, match=message):
        client.predict("a cat", image=image, steps=2, api_name="/generate", **kwargs)


def test_a_bare_string_is_not_an_image_input(client):
    """A string is not an upload (gradio_client uploads the client's own files for FileData
    payloads; a string goes through as text and would name a file on the server)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="must be an uploaded image file"):
        client.predict("a cat", image="/etc/passwd", steps=1, api_name="/generate")
    image_path, _ = client.predict("still serving", steps=1, api_name="/generate")
    assert Path(image_path).is_file()


def test_only_files_in_gradios_upload_folder_are_read(tmp_path, monkeypatch):
    """ui.inputs.images refuses, unread, a payload naming a file outside Gradio's upload folder."""
    from engine.generation.types import UserFacingError
    from ui import inputs

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    (tmp_path / "uploads" / "abc").mkdir(parents=True)
    inside = tmp_path / "uploads" / "abc" / "cat.png"
    inside.write_bytes(good())
    assert inputs.images({"path": str(inside)}) == (str(inside.resolve()),)
    assert inputs.images([{"path": str(inside)}, {"path": str(inside)}]) == (str(inside.resolve()),) * 2
    for outside in ("/etc/passwd", str(tmp_path / "uploads" / ".." / "secret.png")):
        with pytest.raises(UserFacingError, match="not an upload"):
            inputs.images({"path": outside})
    with pytest.raises(UserFacingError, match="must be an uploaded image file"):
        inputs.images(["/etc/passwd"])


@pytest.mark.parametrize("endpoint", ["/generate", "/generate_stream"])
def test_an_image_for_a_model_that_takes_none_says_what_to_do(client, files, endpoint):
    """The model's family takes no input image: a readable error that names the model and what to
    do, before any work; the app keeps serving (that model from text, the demo with the image)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = handle_file(files("for-text-only.png", png(noise(64, 64, seed=5))))
    with pytest.raises(AppError) as exc:
        client.predict("a cat", model=TEXT_ONLY, image=image, steps=1, api_name=endpoint)
    message = str(exc.value)
    assert f"{TEXT_ONLY_NAME} takes no input image" in message, message
    assert "remove it, or choose a model that edits or does image-to-image" in message and "Traceback" not in message
    with pytest.raises(AppError, match="Strength applies to image-to-image: give an input image"):
        client.predict("a cat", model=TEXT_ONLY, strength=0.5, steps=1, api_name=endpoint)

    image_path, parameters = client.predict("a cat", model=TEXT_ONLY, steps=1, seed=2, api_name="/generate")
    info = parse_infotext(parameters)
    assert info["Model"] == TEXT_ONLY and "Input images" not in info and Path(image_path).is_file()
    _, parameters = client.predict("a cat", model="demo", image=image, steps=2, seed=2, api_name="/generate")
    assert parse_infotext(parameters)["Input images"] == "1"

