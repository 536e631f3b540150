"""Pretrained weights by name, with no network: a loopback Hugging Face Hub and a loopback GitHub release.

``LoopbackHub`` speaks the part of the hub's file protocol that ``huggingface_hub.hf_hub_download``
(huggingface_hub/file_download.py: ``get_hf_file_metadata``, ``_get_metadata_or_catch_error``,
``http_get``) uses: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` answered like an LFS file,
a 302 to a blob server on another port (so another origin: the client stops following the HEAD
there and reads the metadata off the redirect) with ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` (the SHA-256) and ``X-Linked-Size``; 404s with the hub's ``X-Error-Code``
(``RepoNotFound``, ``EntryNotFound``); the blob server honours ``Range`` and can cut a body
short. Both listen on 127.0.0.1 and log every request; the loads run in subprocesses because
huggingface_hub reads ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` when it is imported.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import ROOT
from mambaout_jax.convert import PRETRAINED, resolve_tag
from mambaout_jax.convert.verify import compare_logits, timm_forward
from mambaout_jax.convert.weights import load_pretrained
from mambaout_jax.models.registry import get_model_spec
from torch_reference import random_timm_model, timm_to_authors

TAG = "mambaout_femto.in1k"
REPO = f"timm/{TAG}"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class LoopbackHub:
    """A hub (``endpoint``) and its blob store (another port) on 127.0.0.1."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.cut_bodies = False  # blob GETs send half the body, then close the connection
        self.requests: list[tuple[str, str, str]] = []  # (server, method, path)
        self.blob_server = self._serve("blobs", self._blob)
        self.hub_server = self._serve("hub", self._resolve)
        self.endpoint = f"http://127.0.0.1:{self.hub_server.server_address[1]}"

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.repos.setdefault(repo, {})[filename] = data
        self.blobs[hashlib.sha256(data).hexdigest()] = data

    def _serve(self, name, handle):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.requests.append((name, "HEAD", self.path))
                handle(self, body=False)

            def do_GET(self):
                hub.requests.append((name, "GET", self.path))
                handle(self, body=True)

        server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    @staticmethod
    def _commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _resolve(self, h, body: bool):
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)(\?.*)?", h.path)
        repo = m and m.group("repo")
        if repo not in self.repos:
            return self._reply(h, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        files = self.repos[repo]
        commit = {"X-Repo-Commit": self._commit(repo)}
        if m.group("file") not in files:
            return self._reply(h, 404, {**commit, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        data = files[m.group("file")]
        sha = hashlib.sha256(data).hexdigest()
        self._reply(h, 302, {
            **commit,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',  # the git object id of the LFS pointer
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(data)),
            "Location": f"http://127.0.0.1:{self.blob_server.server_address[1]}/blobs/{sha}",
        })  # fmt: skip

    def _blob(self, h, body: bool):
        data = self.blobs.get(h.path.rsplit("/", 1)[-1])
        if data is None:
            return self._reply(h, 404, {})
        start = 0
        status, headers = 200, {}
        if m := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(m.group(1))
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        part = data[start:]
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(part)), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            if self.cut_bodies:
                h.wfile.write(part[: len(part) // 2])
                h.wfile.flush()
                h.close_connection = True
                return
            h.wfile.write(part)

    @staticmethod
    def _reply(h, status: int, headers: dict):
        h.send_response(status)
        for k, v in {**headers, "Content-Length": "0"}.items():
            h.send_header(k, v)
        h.end_headers()

    def close(self):
        for server in (self.hub_server, self.blob_server):
            server.shutdown()
            server.server_close()


class LoopbackRelease(LoopbackHub):
    """The authors' GitHub release: ``GET /<file>`` (urllib follows GitHub's redirect like any other)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_bodies = False
        self.requests = []
        self.server = self._serve("release", self._file)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/download/model"

    def _file(self, h, body: bool):
        data = self.files.get(h.path.rsplit("/", 1)[-1])
        if data is None:
            return self._reply(h, 404, {})
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data[: len(data) // 2] if self.cut_bodies else data)
            h.wfile.flush()
            h.close_connection = True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def femto():
    """timm's mambaout_femto with every parameter random, a batch, and its logits."""
    tm = random_timm_model("mambaout_femto", seed=5)
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3), dtype=np.float32)
    return tm, x, timm_forward(tm, x)


def _safetensors_bytes(tmp_path, tm) -> bytes:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def _pth_bytes(tmp_path, sd) -> bytes:
    path = tmp_path / "w.pth"
    torch.save(sd, str(path))
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path):
    server = LoopbackHub()
    yield server
    server.close()


@pytest.fixture
def release():
    server = LoopbackRelease()
    yield server
    server.close()


_LOAD = """
import sys, json, numpy as np, mambaout_jax
from mambaout_jax.convert.verify import flax_forward
name, pretrained, source, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
x = np.random.default_rng(1).standard_normal((2, 64, 64, 3), dtype=np.float32)
model = mambaout_jax.create_model(name, pretrained=pretrained, pretrained_source=source)
np.save(out, flax_forward(model, x))
"""


def _env(tmp_path, endpoint: str, *, offline: bool = False, release_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1", MAMBAOUT_CACHE=str(tmp_path / "mambaout_cache"), JAX_PLATFORMS="cpu",
        MAMBAOUT_RELEASE_URL=release_url or "http://127.0.0.1:9/unused",
    )  # fmt: skip
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _load(tmp_path, env, name, pretrained=True, source="hub"):
    out = tmp_path / f"logits_{len(list(tmp_path.glob('logits_*')))}.npy"
    r = subprocess.run(
        [sys.executable, "-c", _LOAD, name, json.dumps(pretrained), source, str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    return r, (np.load(out) if r.returncode == 0 else None)


def _cli(env, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_torch_weights.py"), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


# ---- the table ---------------------------------------------------------------------------------


def test_table_is_timms_default_cfgs():
    """The 12 tags with timm 1.0.31's pretrained_cfg, timm's default tag per variant, and the registry agrees."""
    import timm
    from timm.models.mambaout import default_cfgs

    timm_tags = [f"{m}.{t}" for m, cfg in default_cfgs.items() for t in cfg.tags if t]
    assert list(PRETRAINED) == timm_tags and len(timm_tags) == 12
    for tag, ours in PRETRAINED.items():
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg["hf_hub_id"] == ours.hf_hub_id
        assert (cfg["input_size"][1], cfg["test_input_size"][1]) == (ours.input_size, ours.test_input_size), tag
        assert (cfg["crop_pct"], cfg.get("test_crop_pct") or 1.0) == (ours.crop_pct, ours.test_crop_pct), tag
        assert (cfg["crop_mode"], cfg["num_classes"]) == (ours.crop_mode, ours.num_classes), tag
        spec = get_model_spec(tag).eval  # what preprocessing reads
        assert (spec.input_size, spec.crop_pct, spec.crop_mode, spec.num_classes) == (
            ours.input_size, ours.crop_pct, ours.crop_mode, ours.num_classes
        ), tag  # fmt: skip
    for model, cfg in default_cfgs.items():
        if cfg.tags[0]:
            assert resolve_tag(model).tag == f"{model}.{cfg.tags[0]}"  # create_model(model, pretrained=True)
    assert resolve_tag("hf-hub:timm/mambaout_tiny.in1k") is resolve_tag("timm/mambaout_tiny.in1k") is resolve_tag("mambaout_tiny")


def test_unknown_tag_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pretrained weights 'mambaout_tiny.in22k'; known tags: mambaout_femto.in1k, .*mambaout_base_plus_rw.sw_e150_in12k$"):
        resolve_tag("mambaout_tiny.in22k")
    with pytest.raises(ValueError, match="test_mambaout has no published pretrained weights"):
        resolve_tag("test_mambaout")
    r = _cli(_env(tmp_path, "http://127.0.0.1:9"), "--pretrained", "mambaout_tiny.in22k", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "known tags: mambaout_femto.in1k" in r.stderr and "Traceback" not in r.stderr


def test_unknown_pretrained_source_lists_the_known_ones(tmp_path, monkeypatch):
    for key, value in _env(tmp_path, "http://127.0.0.1:9").items():  # were it to download: loopback only
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"unknown pretrained source 'github'; use one of hub, release$"):
        load_pretrained("mambaout_femto", source="github")


# ---- the hub -----------------------------------------------------------------------------------


def test_hub_download_matches_timm_then_loads_offline_from_the_cache(tmp_path, hub, femto):
    tm, x, ref = femto
    hub.add(REPO, "model.safetensors", _safetensors_bytes(tmp_path, tm))
    r, logits = _load(tmp_path, _env(tmp_path, hub.endpoint), "mambaout_femto")  # pretrained=True: the default tag
    assert r.returncode == 0, r.stderr
    assert compare_logits(ref, logits)["rel_err"] <= 2e-5
    assert ("hub", "HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    assert any(s == "blobs" and m == "GET" for s, m, _ in hub.requests)
    snapshot = tmp_path / "hf_home" / "hub" / "models--timm--mambaout_femto.in1k" / "snapshots"
    assert [p.name for p in snapshot.glob("*/*")] == ["model.safetensors"]  # the standard cache, under HF_HOME

    seen = len(hub.requests)
    offline = _env(tmp_path, hub.endpoint, offline=True)
    for name, pretrained in (("mambaout_femto", True), ("mambaout_femto", TAG), ("mambaout_femto", REPO),
                             ("mambaout_femto", f"hf-hub:{REPO}"), (TAG, True)):  # fmt: skip
        r, again = _load(tmp_path, offline, name, pretrained)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(again, logits), (name, pretrained)
    # The command lines, offline from the same cache: predict.py and eval.py take the tag (and its settings).
    import skimage.data

    photo = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--pretrained", TAG, photo, "--json", "--top", "5"],
                       env=offline, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"weights: {TAG} (" in r.stderr and len(json.loads(r.stdout)[0]["top"]) == 5
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--pretrained", TAG, "--source", "digits", "--batch-size", "64"],
                       env=offline, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["model"] == TAG and result["image_size"] == 32 and result["count"] > 0
    assert len(hub.requests) == seen  # offline: nothing asked of the server


def test_hub_falls_back_to_pytorch_model_bin(tmp_path, hub, femto):
    tm, x, ref = femto
    hub.add(REPO, "pytorch_model.bin", _pth_bytes(tmp_path, tm.state_dict()))
    r = _cli(_env(tmp_path, hub.endpoint), "--pretrained", TAG, tmp_path / "femto.safetensors")
    assert r.returncode == 0, r.stderr
    assert f"{TAG} (" in r.stdout and "pytorch_model.bin" in r.stdout
    assert ("hub", "HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests  # asked first
    import mambaout_jax
    from mambaout_jax.convert.verify import flax_forward

    model = mambaout_jax.create_model("mambaout_femto", pretrained=tmp_path / "femto.safetensors")
    assert compare_logits(ref, flax_forward(model, x))["rel_err"] <= 2e-5
    # The hub goes away: the cached pytorch_model.bin is used, after one round of huggingface_hub's
    # retries (for model.safetensors), not a second one for the file that is already there.
    r = _cli(_env(tmp_path, f"http://127.0.0.1:{_closed_port()}"), "--pretrained", TAG, tmp_path / "again.safetensors")
    assert r.returncode == 0, r.stderr
    assert _retry_rounds(r.stderr) == 1, r.stderr
    again, first = (load_file(tmp_path / f"{n}.safetensors") for n in ("again", "femto"))
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)


def _retry_rounds(stderr: str) -> int:
    """How many times huggingface_hub's last retry was printed: once per round of retries, as long as
    nothing else (the root logger that orbax's import gives a handler) prints its messages again."""
    return len(re.findall(r"Retrying in \d+s \[Retry 5/5\]", stderr))


def _closed_port() -> int:
    """A free port on 127.0.0.1, closed again: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_with_an_empty_cache_says_how_to_fetch(tmp_path, hub):
    r = _cli(_env(tmp_path, hub.endpoint, offline=True), "--pretrained", TAG, tmp_path / "o.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    cache = tmp_path / "hf_home" / "hub"
    assert f"{TAG}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set" in r.stderr
    assert f"hf download {REPO} model.safetensors" in r.stderr
    assert hub.requests == [] and not (tmp_path / "o.safetensors").exists()


def test_network_error_is_said_plainly(tmp_path):
    port = _closed_port()
    r = _cli(_env(tmp_path, f"http://127.0.0.1:{port}"), "--pretrained", TAG, tmp_path / "o.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _retry_rounds(r.stderr) == 1, r.stderr  # huggingface_hub's ~23 s of retries, once, not once per file
    assert f"{TAG}: cannot reach the hub at http://127.0.0.1:{port} (network error: ConnectError" in r.stderr
    assert "not in the Hugging Face cache" in r.stderr


def test_interrupted_download_is_never_used(tmp_path, hub, femto):
    tm, x, ref = femto
    hub.add(REPO, "model.safetensors", _safetensors_bytes(tmp_path, tm))
    hub.cut_bodies = True
    env = _env(tmp_path, hub.endpoint)
    r = _cli(env, "--pretrained", TAG, tmp_path / "o.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{TAG}: downloading {REPO}/model.safetensors from {hub.endpoint} failed" in r.stderr
    assert sum(m == "GET" for s, m, _ in hub.requests if s == "blobs") > 1  # huggingface_hub resumed, then gave up
    repo_cache = tmp_path / "hf_home" / "hub" / "models--timm--mambaout_femto.in1k"
    assert not list(repo_cache.glob("snapshots/*/*")) and not list(repo_cache.glob("blobs/*[!e]"))
    r = _cli(_env(tmp_path, hub.endpoint, offline=True), "--pretrained", TAG, tmp_path / "o.safetensors")
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr
    hub.cut_bodies = False  # the network is back: a clean download, and the right weights
    r, logits = _load(tmp_path, env, "mambaout_femto")
    assert r.returncode == 0, r.stderr
    assert compare_logits(ref, logits)["rel_err"] <= 2e-5


def test_corrupt_cached_blob_is_refused(tmp_path, hub, femto):
    tm, _, _ = femto
    hub.add(REPO, "model.safetensors", _safetensors_bytes(tmp_path, tm))
    env = _env(tmp_path, hub.endpoint)
    assert _cli(env, "--pretrained", TAG, tmp_path / "a.safetensors").returncode == 0
    (blob,) = (tmp_path / "hf_home" / "hub" / "models--timm--mambaout_femto.in1k" / "blobs").iterdir()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # same size, one bit off: huggingface_hub's own size check cannot see it
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    r = _cli(_env(tmp_path, hub.endpoint, offline=True), "--pretrained", TAG, tmp_path / "b.safetensors")
    assert r.returncode == 2 and f"the cached file {blob} is corrupt" in r.stderr


# ---- the authors' GitHub release ---------------------------------------------------------------


def test_release_download_checks_and_caches(tmp_path, release, femto):
    tm, x, ref = femto
    data = _pth_bytes(tmp_path, {"model": timm_to_authors(tm.state_dict())})  # the authors' layout, as released
    release.files["mambaout_femto.pth"] = data
    env = _env(tmp_path, "http://127.0.0.1:9", release_url=release.url)
    r, logits = _load(tmp_path, env, "mambaout_femto", True, "release")
    assert r.returncode == 0, r.stderr
    assert compare_logits(ref, logits)["rel_err"] <= 2e-5
    cached = tmp_path / "mambaout_cache" / "releases" / "mambaout_femto.pth"
    assert cached.read_bytes() == data
    assert (cached.parent / "mambaout_femto.pth.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()

    seen = len(release.requests)
    r, again = _load(tmp_path, {**env, "HF_HUB_OFFLINE": "1"}, "mambaout_femto", TAG, "release")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(again, logits) and len(release.requests) == seen

    cached.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    r = _cli({**env, "HF_HUB_OFFLINE": "1"}, "--pretrained", TAG, "--pretrained-source", "release", tmp_path / "o.safetensors")
    assert r.returncode == 2 and f"the cached file {cached} is corrupt" in r.stderr


def test_release_offline_empty_cache_and_interrupted_download(tmp_path, release, femto):
    tm, _, _ = femto
    release.files["mambaout_femto.pth"] = _pth_bytes(tmp_path, {"model": timm_to_authors(tm.state_dict())})
    env = _env(tmp_path, "http://127.0.0.1:9", release_url=release.url)
    cache = tmp_path / "mambaout_cache" / "releases"
    args = ("--pretrained", TAG, "--pretrained-source", "release", tmp_path / "o.safetensors")
    r = _cli({**env, "HF_HUB_OFFLINE": "1"}, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{TAG}: the authors' release file is not in the cache {cache} and HF_HUB_OFFLINE is set" in r.stderr
    assert f"curl -L --create-dirs -o {cache / 'mambaout_femto.pth'} {release.url}/mambaout_femto.pth" in r.stderr
    assert release.requests == []

    release.cut_bodies = True
    r = _cli(env, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{TAG}: downloading {release.url}/mambaout_femto.pth failed" in r.stderr or "was interrupted" in r.stderr
    assert "nothing was cached" in r.stderr
    assert list(cache.iterdir()) == []  # no partial file, under any name
    r = _cli({**env, "HF_HUB_OFFLINE": "1"}, *args)
    assert r.returncode == 2 and "not in the cache" in r.stderr

    r = _cli(env, "--pretrained", "mambaout_small_rw.sw_e450_in1k", "--pretrained-source", "release", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "the authors' GitHub release has no file for it" in r.stderr
