"""Loading a backbone as the CLIs do (runner.offline_unless_reachable, then common.load_backbone)
without the Hugging Face hub: it fails within seconds, in at most two short
lines naming that backbone's files, and files already in the cache load without the hub.
The hub is made unreachable (or the cache empty) by monkeypatching, so these tests give the
same answer on a machine with network; the one test of the real probe skips there."""
import socket
import time

import huggingface_hub.constants as hub
import pytest
import torch

import common
import runner
from common import UserError

RECIPES = {  # backbone -> what its second line must name
    "biomedclip": ["hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "text tower",
                   "--backbone local-dir:FOLDER", "HF_HUB_OFFLINE=1"],
    "clip": ["hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors", "HF_HUB_OFFLINE=1"],
    "hf-hub:some-org/some-repo": ["hf download some-org/some-repo", "HF_HUB_OFFLINE=1"],
}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and the offline flag off (conftest sets HF_HUB_OFFLINE=1); both
    are put back after the test (offline_unless_reachable sets them for the process)."""
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


def load_as_the_clis_do(name):
    runner.offline_unless_reachable(name)
    return common.load_backbone(name)


def failure_message(name) -> str:
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        load_as_the_clis_do(name)
    assert time.monotonic() - start < 10
    return str(error.value)


def assert_names_the_recipe(message, name, recipe=None):
    lines = message.splitlines()
    assert len(lines) <= 2 and all(len(line) < 200 for line in lines), message
    assert f"backbone '{name}'" in lines[0] and "--backbone tiny" in message
    for words in recipe or RECIPES[name]:
        assert words in lines[-1], message
    if name != "biomedclip":
        assert "BiomedCLIP" not in message


@pytest.mark.parametrize("name", list(RECIPES))
def test_unreachable_hub_fails_at_once_with_that_backbones_recipe(empty_cache, monkeypatch, name):
    monkeypatch.setattr(runner, "hub_reachable", lambda timeout=3.0: False)
    message = failure_message(name)
    assert "the Hugging Face hub cannot be reached" in message
    assert_names_the_recipe(message, name)


@pytest.mark.parametrize("name", list(RECIPES))
def test_this_machines_hub_really_unreachable(empty_cache, name):
    if runner.hub_reachable():
        pytest.skip("the Hugging Face hub is reachable from here")
    message = failure_message(name)
    assert "the Hugging Face hub cannot be reached" in message
    assert_names_the_recipe(message, name)


def test_hf_hub_offline_is_named_as_the_reason(empty_cache, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(runner, "hub_reachable", lambda timeout=3.0: pytest.fail("probed despite HF_HUB_OFFLINE"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set") as error:
        load_as_the_clis_do("clip")
    assert_names_the_recipe(str(error.value), "clip")


def cache_repo(cache, repo, files):
    """A repository in the Hugging Face cache layout: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for filename, write in files.items():
        write(snapshot / filename)
    return snapshot


def test_cached_hub_model_loads_without_the_hub(empty_cache, monkeypatch, backbones):
    import json

    from safetensors.torch import save_file

    tiny = backbones("tiny-clip")
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    weights = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    snapshot = cache_repo(empty_cache, "org/tiny-clip", {
        "open_clip_config.json": lambda path: path.write_text(json.dumps(config)),
        "open_clip_model.safetensors": lambda path: save_file(weights, str(path))})
    monkeypatch.setattr(runner, "hub_reachable", lambda timeout=3.0: False)

    start = time.monotonic()
    bb = load_as_the_clis_do("hf-hub:org/tiny-clip")
    assert time.monotonic() - start < 10
    assert bb.mean == (0.5, 0.5, 0.5) and bb.image_size == 32
    ids = tiny.tokenize(["a photo of a lung"])
    torch.testing.assert_close(bb.encode_text(ids), tiny.encode_text(ids))

    # config cached, weights not: open_clip would go on with random weights; we refuse
    (snapshot / "open_clip_model.safetensors").unlink()
    assert_names_the_recipe(failure_message("hf-hub:org/tiny-clip"), "hf-hub:org/tiny-clip",
                            ["hf download org/tiny-clip", "HF_HUB_OFFLINE=1"])


def test_probe_finds_a_listening_hub_or_proxy_and_not_a_closed_port(monkeypatch):
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(hub, "ENDPOINT", f"https://127.0.0.1:{port}")
        assert runner.hub_reachable(timeout=2)
        monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")  # the hub behind a proxy
        assert runner.hub_reachable(timeout=2)
    monkeypatch.setattr(hub, "ENDPOINT", f"https://127.0.0.1:{port}")  # the port is closed now
    monkeypatch.delenv("HTTPS_PROXY")
    start = time.monotonic()
    assert not runner.hub_reachable(timeout=2)
    assert time.monotonic() - start < 3


@pytest.fixture
def loopback_hub(empty_cache, monkeypatch):
    """serve(files): a Hugging Face hub on 127.0.0.1 answering for any repository with `files`
    ({name: bytes}) and 404 "EntryNotFound" for every other file, as the real hub answers."""
    import hashlib
    import http.server
    import threading

    from huggingface_hub import constants

    served = {}

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self, body):
            content = served.get(self.path.rsplit("/", 1)[-1])
            self.send_response(200 if content is not None else 404)
            if content is None:
                self.send_header("X-Error-Code", "EntryNotFound")
                content = b""
            else:
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content) if content else 0))
            self.end_headers()
            if body:
                self.wfile.write(content)

        def do_HEAD(self):
            self.answer(False)

        def do_GET(self):
            self.answer(True)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    yield served.update
    server.shutdown()
    server.server_close()


def test_weights_the_answering_hub_does_not_give_are_an_error_not_random_weights(loopback_hub, backbones):
    """The hub answers (so the CLIs stay online) and serves the config, but not the weights:
    open_clip would warn and go on with random weights; we stop with one line."""
    import json

    from safetensors.torch import save

    tiny = backbones("tiny-clip")
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}}
    loopback_hub({"open_clip_config.json": json.dumps(config).encode()})
    assert runner.hub_reachable(timeout=2)
    with pytest.raises(UserError) as error:
        load_as_the_clis_do("hf-hub:org/no-weights")
    message = str(error.value)
    assert "\n" not in message and message.startswith("could not load the weights of backbone 'hf-hub:org/no-weights'")
    assert "open_clip_pytorch_model.bin" in message and "404" in message and "local-dir:FOLDER" in message
    # the same hub with the weights: it loads them
    loopback_hub({"open_clip_model.safetensors": save({k: v.contiguous() for k, v in tiny.model.state_dict().items()})})
    bb = load_as_the_clis_do("hf-hub:org/with-weights")
    ids = tiny.tokenize(["a photo of a lung"])
    torch.testing.assert_close(bb.encode_text(ids), tiny.encode_text(ids))
