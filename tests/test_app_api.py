"""app.py flags, and the named `/generate` endpoint called through gradio_client against the real server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

import app

API_PARAMETERS = [
    "prompt", "negative_prompt", "model", "width", "height", "steps",
    "guidance", "seed", "vram_limit", "fp8", "disk_offload", "loras", "weights", "image", "strength", "compile",
]


# ---------------------------------------------------------------- flags
@pytest.fixture
def no_gradio_env(monkeypatch):
    for key in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(key, raising=False)


def test_defaults(no_gradio_env):
    args = app.parse_args([])
    kw = app.launch_kwargs(args)
    assert (kw["server_name"], kw["server_port"], kw["share"], kw["auth"]) == ("127.0.0.1", 7860, False, None)
    assert args.model_dir == Path("models") and args.outputs_dir == Path("outputs") and args.source == "hf"
    assert kw["allowed_paths"] == [str(Path("outputs").resolve())]


def test_listen_host_port_share_source(no_gradio_env):
    assert app.launch_kwargs(app.parse_args(["--listen"]))["server_name"] == "0.0.0.0"
    kw = app.launch_kwargs(app.parse_args(["--host", "192.168.1.5", "--port", "8080", "--share"]))
    assert (kw["server_name"], kw["server_port"], kw["share"]) == ("192.168.1.5", 8080, True)
    args = app.parse_args(["--model-dir", "/data/m", "--outputs-dir", "/data/o", "--source", "modelscope"])
    assert (args.model_dir, args.outputs_dir, args.source) == (Path("/data/m"), Path("/data/o"), "modelscope")


def test_spaces_environment_is_used_without_flags(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    kw = app.launch_kwargs(app.parse_args([]))
    assert (kw["server_name"], kw["server_port"]) == ("0.0.0.0", 7861)
    kw = app.launch_kwargs(app.parse_args(["--host", "127.0.0.1", "--port", "9000"]))
    assert (kw["server_name"], kw["server_port"]) == ("127.0.0.1", 9000)


def test_auth_inline_and_file(tmp_path):
    assert app.parse_args(["--auth", "me:secret"]).auth == [("me", "secret")]
    assert app.parse_args(["--auth", "a:1,b:p:w"]).auth == [("a", "1"), ("b", "p:w")]
    f = tmp_path / "users.txt"
    f.write_text("# who may log in\nalice:wonder\n\nbob:builder\n")
    assert app.parse_args(["--auth", str(f)]).auth == [("alice", "wonder"), ("bob", "builder")]


@pytest.mark.parametrize(
    "argv",
    [["--auth", "nopassword"], ["--auth", ":x"], ["--source", "s3"], ["--port", "0"], ["--port", "x"],
     ["--pinned-ram-gb", "lots"], ["--pinned-ram-gb", "-1"], ["--pinned-ram-gb", "inf"]],
)
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        app.parse_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_pinned_ram_flag_and_environment(monkeypatch, tmp_path, capsys):
    from engine.transfer.pinned import PINNED_RAM_ENV, PinnedBudget

    monkeypatch.delenv(PINNED_RAM_ENV, raising=False)
    assert app.parse_args([]).pinned_ram_gb is None
    assert app.parse_args(["--pinned-ram-gb", "12.5"]).pinned_ram_gb == 12.5
    monkeypatch.setenv(PINNED_RAM_ENV, "half")  # a bad environment value stops the start, with its name
    with pytest.raises(SystemExit):
        app.parse_args([])
    assert PINNED_RAM_ENV in capsys.readouterr().err
    with pytest.raises(ValueError, match=PINNED_RAM_ENV):
        PinnedBudget().limit_bytes
    monkeypatch.delenv(PINNED_RAM_ENV)

    class Started(Exception):
        pass

    def studio_factory(*args, **kwargs):
        raise Started(os.environ.get(PINNED_RAM_ENV))

    with pytest.raises(Started, match="3.0"):  # the flag reaches the engine before the Studio exists
        app.main(["--pinned-ram-gb", "3", "--model-dir", str(tmp_path / "m"), "--outputs-dir", str(tmp_path / "o")], studio_factory)
    assert PinnedBudget().limit_bytes == 3 * 1024**3


def test_model_dir_is_where_downloads_go_only_when_given(tmp_path):
    seen = {}

    class Started(Exception):
        pass

    def studio_factory(models_dir, outputs_dir, source="hf", **kwargs):
        seen.update(models_dir=models_dir, **kwargs)
        raise Started

    with pytest.raises(Started):
        app.main(["--model-dir", str(tmp_path / "m"), "--outputs-dir", str(tmp_path / "o")], studio_factory)
    assert seen == {"models_dir": tmp_path / "m", "download_dir": tmp_path / "m"}
    seen.clear()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(Started):
            app.main(["--outputs-dir", str(tmp_path / "o")], studio_factory)
    finally:
        os.chdir(old)
    assert seen == {"models_dir": Path("models")}  # downloads: the standard hub caches


def test_parse_auth_rejects_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n# nothing\n")
    with pytest.raises(argparse.ArgumentTypeError):
        app.parse_auth(str(f))


# ---------------------------------------------------------------- API against the running app
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.browser.server import running_server

    tmp = tmp_path_factory.mktemp("api")
    # compile requests use Dynamo + AOTAutograd here (seconds; inductor is tested in test_compile.py)
    env = {"LOWVRAM_COMPILE_BACKEND": "aot_eager", "LOWVRAM_STUDIO_CACHE": str(tmp / "cache")}
    with running_server(tmp, env=env) as url:
        yield url, tmp


@pytest.fixture(scope="module")
def client(server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server[0], verbose=False, download_files=str(server[1] / "downloads"))


@pytest.mark.slow
def test_generate_endpoint_parameter_names(client):
    info = client.view_api(return_format="dict", print_info=False)
    endpoint = info["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == API_PARAMETERS
    optional = {p["parameter_name"] for p in endpoint["parameters"] if p["parameter_has_default"]}
    assert optional == set(API_PARAMETERS) - {"prompt"}
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoint["parameters"]}
    assert defaults["model"] is None and defaults["vram_limit"] is None and defaults["seed"] == -1
    assert len(endpoint["returns"]) == 2


@pytest.mark.slow
def test_generate_by_name_returns_png_and_parameters(client, server):
    from PIL import Image

    from tests.judge import judge
    from tools.demo_shapes import held_out_scenes

    scene = held_out_scenes(1)[0]  # a caption the demo never saw in training
    image_path, parameters = client.predict(
        prompt=scene.caption(),
        negative_prompt="blurry",
        model=None,
        width=None,
        height=None,
        steps=None,
        guidance=None,
        seed=1234,
        vram_limit=None,
        fp8=False,
        disk_offload=False,
        api_name="/generate",
    )
    assert parameters and "1234" in parameters
    path = Path(image_path)
    assert path.suffix.lower() == ".png" and path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.info.get("parameters") == parameters
        verdict = judge(im, scene)  # the picture shows the caption: the request reached the denoiser
    assert verdict.colours_and_place_ok, verdict
    saved = list((server[1] / "outputs").rglob("*.png"))
    assert saved, "the PNG should be saved in --outputs-dir"


@pytest.mark.slow
def test_generate_with_weights_nf4_names_it_in_the_parameters(client):
    _, parameters = client.predict(prompt="a fox", steps=1, seed=5, weights="nf4", api_name="/generate")
    assert "Weights: nf4" in parameters


@pytest.mark.slow
def test_generate_with_compile_says_compile_on_and_a_bad_value_is_named(client):
    from gradio_client.exceptions import AppError

    _, parameters = client.predict(prompt="a fox", steps=1, seed=5, compile=True, api_name="/generate")
    assert "Compile: on" in parameters
    with pytest.raises(AppError, match="compile"):
        client.predict(prompt="a fox", steps=1, compile="maybe", api_name="/generate")


@pytest.mark.slow
def test_generate_minimal_call_uses_defaults(client):
    image_path, parameters = client.predict("just a prompt", steps=1, api_name="/generate")
    assert Path(image_path).is_file() and parameters


@pytest.mark.slow
def test_bad_width_is_a_readable_error_and_the_next_call_works(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as exc:
        client.predict(prompt="bad", width=100, steps=1, api_name="/generate")
    message = str(exc.value)
    assert "100" in message and "Traceback" not in message
    image_path, _ = client.predict(prompt="good", steps=1, api_name="/generate")
    assert Path(image_path).is_file()


@pytest.mark.slow
def test_unknown_model_is_a_readable_error(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as exc:
        client.predict(prompt="x", model="no-such-model", steps=1, api_name="/generate")
    assert "no-such-model" in str(exc.value)


@pytest.mark.slow
def test_auth_file_protects_the_app(tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from tests.browser.server import running_server

    users = tmp_path / "users.txt"
    users.write_text("alice:wonder\n")
    with running_server(tmp_path / "srv", ["--auth", str(users)]) as url:
        with pytest.raises(Exception):
            gradio_client.Client(url, verbose=False)
        with pytest.raises(Exception):
            gradio_client.Client(url, auth=("alice", "wrong"), verbose=False)
        client = gradio_client.Client(url, auth=("alice", "wonder"), verbose=False)
        assert "/generate" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
