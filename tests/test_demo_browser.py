"""The Gradio demo in a real headless Chromium: upload a photo, read the page, compare with predict.py.

The demo runs as users start it (``python -m mambaout_jax.demo --weights W --port P``) on a free
loopback port. Offline is checked on both sides: the browser can reach nothing but 127.0.0.1 (every
other host name fails to resolve, any other address goes to a closed proxy) and every request it
made is listed and checked; the server runs under a socket guard (a ``sitecustomize`` on its
PYTHONPATH) that refuses and logs any connection or name lookup that is not loopback.

``python tests/test_demo_browser.py --weights runs/digits --out docs/demo.png`` takes the README's
screenshot with the same code.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from data_fixtures import require

CHROMIUM = "/usr/lib/chromium/chromium"  # Debian's /usr/bin/chromium is a wrapper script around it
CHROMEDRIVER = "/usr/bin/chromedriver"  # named explicitly: otherwise Selenium tries to download one
START_TIMEOUT = 240  # s: importing JAX and Gradio and compiling the model, on a busy 2-core machine
PAGE_TIMEOUT = 90

NETWORK_GUARD = '''
import ipaddress, os, socket

def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False

def _refuse(what):
    with open(os.environ["NETWORK_GUARD_LOG"], "a") as f:
        f.write(what + "\\n")
    raise ConnectionRefusedError("network guard: " + what)

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        _refuse(f"connect {address!r}")

def connect(self, address):
    _check(self, address)
    return _connect(self, address)

def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)

def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guarded_env(guard_dir: Path, log: Path) -> dict:
    (guard_dir / "sitecustomize.py").write_text(NETWORK_GUARD)
    env = dict(os.environ, JAX_PLATFORMS="cpu", NETWORK_GUARD_LOG=str(log), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class DemoServer:
    """``python -m mambaout_jax.demo`` in a subprocess, until it serves its page (bounded wait)."""

    def __init__(self, weights, workdir: Path, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.network_log = workdir / "server_network.log"
        self.output = workdir / "demo.log"
        (workdir / "guard").mkdir(exist_ok=True)
        env = guarded_env(workdir / "guard", self.network_log)
        self._out = open(self.output, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mambaout_jax.demo", "--weights", str(weights), "--port", str(self.port), *extra],
            cwd=workdir, env=env, stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the demo exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the demo did not serve {self.url} within {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.output.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._out.close()


def headless_chromium():
    """Selenium driving Debian's Chromium; the network beyond 127.0.0.1 is unreachable for it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver ({package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,820",
        # no name resolves except loopback; any address literal goes to a closed port (loopback bypasses it)
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    return driver


def requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def shown_top_classes(driver) -> list[tuple[str, float]]:
    """(label, probability) of each bar of the Label, top first. The page prints whole percentages;
    each bar's <meter> carries the exact value the server sent."""
    from selenium.webdriver.common.by import By

    return [
        (m.get_dom_attribute("aria-label"), float(m.get_dom_attribute("value")))
        for m in driver.find_elements(By.CSS_SELECTOR, "#top meter")
    ]


def wait_for_top_classes(driver, expected_labels=None, timeout=PAGE_TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        shown = shown_top_classes(d)
        return shown if len(shown) == 5 and (expected_labels is None or [s[0] for s in shown] == expected_labels) else False

    return WebDriverWait(driver, timeout).until(ready)


def upload(driver, image: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, PAGE_TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))


def predict_json(weights, images, env) -> list[dict]:
    """predict.py --json as a user runs it; batch 1 as the demo, so the very same computation."""
    cmd = [sys.executable, str(ROOT / "predict.py"), "--weights", str(weights), "--json", "--batch-size", "1", *map(str, images)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """test_mambaout with 1000 classes (ImageNet's names) and every parameter random, scaled so
    the probabilities spread out (the init's are all ~1/1000, and ties would decide the top 5)."""
    from mambaout_jax.convert import save_flax_weights
    from mambaout_jax.models.factory import build_model
    from mambaout_jax.models.params import get_params

    rng = np.random.default_rng(0)
    params = {}
    for key, value in get_params(build_model("test_mambaout", num_classes=1000, seed=0)).items():
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if key.endswith("/scale"):
            params[key] = 1 + 0.2 * noise
        elif value.ndim == 1:
            params[key] = 0.1 * noise
        else:
            params[key] = noise / np.sqrt(np.prod(value.shape[:-1]))
    path = tmp_path_factory.mktemp("weights") / "test_mambaout_random.safetensors"
    save_flax_weights(path, params, model="test_mambaout", num_classes=1000)
    return path


def test_page_shows_predict_py_top5_for_an_upload_and_an_example_offline(random_weights, tmp_path):
    require("selenium", "drives the browser")
    import skimage.data
    from selenium.webdriver.common.by import By

    photos = Path(skimage.data.__file__).parent
    uploaded, example = photos / "chelsea.png", photos / "coffee.png"
    server = DemoServer(random_weights, tmp_path)
    driver = None
    try:
        expected = predict_json(random_weights, [uploaded, example], guarded_env(tmp_path / "guard", server.network_log))
        driver = headless_chromium()
        driver.get(server.url)
        upload(driver, uploaded)
        want = [(s["label"], s["prob"]) for s in expected[0]["top"]]
        assert wait_for_top_classes(driver, [label for label, _ in want]) == want  # exactly the floats predict.py printed
        about = driver.find_element(By.ID, "about").text
        assert "test_mambaout" in about and "1000 classes (imagenet-1k)" in about and "160 px" in about
        latency = driver.find_element(By.ID, "latency").text
        assert re.fullmatch(r"[\d.]+ ms \(preprocessing [\d.]+ ms, model [\d.]+ ms on cpu\)", latency), latency
        driver.save_screenshot(str(tmp_path / "demo.png"))

        # an example photo, clicked: the page then shows that photo's classes
        thumbnails = [img for img in driver.find_elements(By.CSS_SELECTOR, "img") if "coffee" in (img.get_attribute("src") or "")]
        assert thumbnails, "the coffee example is not on the page"
        thumbnails[0].click()
        want = [(s["label"], s["prob"]) for s in expected[1]["top"]]
        assert wait_for_top_classes(driver, [label for label, _ in want]) == want

        outside = sorted(u for u in requested_urls(driver) if not re.match(r"(http://127\.0\.0\.1:\d+/|data:|blob:)", u))
        assert not outside, f"the page asked for things beyond this machine: {outside}"
        assert not server.network_log.exists(), f"the server tried the network:\n{server.network_log.read_text()}"
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
    assert "Running on local URL:  http://127.0.0.1" in server.log() and "gradio.live" not in server.log()


def take_screenshot(weights: str, image: str, out: str) -> None:
    """The README's picture: the demo on ``weights`` with ``image`` uploaded."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        server = DemoServer(Path(weights).absolute(), Path(tmp))
        driver = headless_chromium()
        try:
            driver.get(server.url)
            upload(driver, Path(image).absolute())
            wait_for_top_classes(driver)
            time.sleep(1)  # the bars animate to their width
            driver.save_screenshot(out)
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Take docs/demo.png")
    p.add_argument("--weights", default="runs/digits")
    p.add_argument("--image", required=True)
    p.add_argument("--out", default="docs/demo.png")
    a = p.parse_args()
    take_screenshot(a.weights, a.image, a.out)
