"""Downloading published weights: timm's files on the Hugging Face Hub, and the authors' GitHub release.

Hub (``download_hub``): ``huggingface_hub.hf_hub_download`` of ``model.safetensors`` from
``timm/<model>.<tag>``, falling back to ``pytorch_model.bin`` when the repository has no safetensors
file (timm's own order, ``timm/models/_hub.py``), into the standard Hugging Face cache. Everything
``huggingface_hub`` honours applies: ``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1``
(cache only), ``HF_ENDPOINT`` (a mirror). ``huggingface_hub`` downloads into a temporary file unique to
the download and renames it into the cache only once its size matches the server's, so an
interrupted transfer never lands there; on top of that, a blob whose cache name is a SHA-256 (the
hub's ETag of LFS files) is hashed and compared on every load.

Release (``download_release``): ``<MAMBAOUT_RELEASE_URL>/<file>``, by default the authors'
``https://github.com/yuweihao/MambaOut/releases/download/model/mambaout_<name>.pth``, into
``<MAMBAOUT_CACHE>/releases/`` (default ``$XDG_CACHE_HOME/mambaout_jax``, i.e.
``~/.cache/mambaout_jax``), streamed to a temporary file, its length checked against
Content-Length, its SHA-256 against the published one when ``pretrained.PRETRAINED`` has one, and
then renamed into place. The authors publish no hashes, so the first complete download's SHA-256 is
recorded next to it (``<file>.sha256``) and every later load checks the cached file against that.
``HF_HUB_OFFLINE=1`` keeps this source offline too.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from mambaout_jax.convert.pretrained import RELEASE_URL, PretrainedWeights
from mambaout_jax.convert.torch_io import CheckpointError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class DownloadError(CheckpointError):
    """Published weights that cannot be had: offline and not cached, a network error, a bad download."""


def _huggingface_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # a lazy attribute of the package otherwise
    except ImportError:
        raise DownloadError(
            "pretrained weights by name come from the Hugging Face Hub through huggingface_hub, which is not "
            "installed: pip install 'mambaout-jax[hub]' (or pip install huggingface_hub)"
        ) from None
    return huggingface_hub


def hub_cache_dir() -> str:
    """The Hugging Face cache ``hf_hub_download`` uses (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    return _huggingface_hub().constants.HF_HUB_CACHE


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (once, when it is imported)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return constants.is_offline_mode()


def download_hub(weights: PretrainedWeights) -> Path:
    """The local path of ``weights``' hub file, downloaded into the cache when not there yet."""
    hf = _huggingface_hub()
    from huggingface_hub import errors

    with _hub_messages_once():
        return _download_hub(hf, errors, weights)


@contextlib.contextmanager
def _hub_messages_once():
    """huggingface_hub prints its messages (a download's retries) through a stderr handler of its own
    and passes them on to the root logger too, which has one as well once anything has logged through
    absl (orbax's import does): each would print twice. During a download, its own handler only."""
    import huggingface_hub.utils.logging  # noqa: F401  (gives the library's logger its handler; lazy otherwise)

    logger = logging.getLogger("huggingface_hub")
    propagate = logger.propagate
    if logger.handlers and logging.getLogger().handlers:
        logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = propagate


def _download_hub(hf, errors, weights: PretrainedWeights) -> Path:
    repo = weights.hf_hub_id
    not_cached: Exception | None = None  # offline, or the network failed, and the file is not in the cache
    for filename in HUB_FILES:
        try:
            # Once the hub could not be reached (huggingface_hub has retried for ~23 s by then), the
            # fallback file is looked for in the cache only, not through another round of retries.
            path = Path(hf.hf_hub_download(repo, filename, local_files_only=not_cached is not None))
        except errors.EntryNotFoundError as e:  # remote 404 (or cached as absent) / not in the cache
            if isinstance(e, errors.LocalEntryNotFoundError) and not_cached is None:
                not_cached = e
            continue
        except errors.RepositoryNotFoundError as e:
            raise DownloadError(
                f"{weights.tag}: the hub at {hf.constants.ENDPOINT} has no repository {repo} ({_first_line(e)})"
            ) from None
        except errors.HfHubHTTPError as e:
            raise DownloadError(
                f"{weights.tag}: downloading {repo}/{filename} from {hf.constants.ENDPOINT} failed: {_first_line(e)}"
            ) from None
        except OSError as e:  # connection refused or reset, a short body that resumes could not complete, disk
            raise DownloadError(
                f"{weights.tag}: downloading {repo}/{filename} from {hf.constants.ENDPOINT} failed "
                f"(network error: {type(e).__name__}: {_first_line(e)}); nothing was added to the cache "
                f"{hub_cache_dir()}"
            ) from None
        except Exception as e:  # httpx's transport errors are not OSErrors
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise
            raise DownloadError(
                f"{weights.tag}: downloading {repo}/{filename} from {hf.constants.ENDPOINT} failed "
                f"(network error: {type(e).__name__}: {_first_line(e)}); nothing was added to the cache "
                f"{hub_cache_dir()}"
            ) from None
        check_blob(path, weights.tag)
        return path
    fetch = f"hf download {repo} {HUB_FILES[0]}"
    if not_cached is not None and is_offline():
        raise DownloadError(
            f"{weights.tag}: not in the Hugging Face cache {hub_cache_dir()} and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded. Fetch it once with network access: {fetch} (or unset HF_HUB_OFFLINE)"
        )
    if not_cached is not None:
        cause = not_cached.__cause__ or not_cached
        raise DownloadError(
            f"{weights.tag}: cannot reach the hub at {hf.constants.ENDPOINT} (network error: "
            f"{type(cause).__name__}: {_first_line(cause)}) and it is not in the Hugging Face cache "
            f"{hub_cache_dir()}. Fetch it once with network access: {fetch}"
        )
    raise DownloadError(f"{weights.tag}: the hub repository {repo} has none of {', '.join(HUB_FILES)}")


def check_blob(path: Path, tag: str) -> None:
    """A cached hub file whose blob is named by its SHA-256 (LFS ETag) must hash to that name."""
    blob = path.resolve()
    if not _SHA256.match(blob.name):
        return
    digest = _sha256(blob)
    if digest != blob.name:
        raise DownloadError(
            f"{tag}: the cached file {blob} is corrupt (SHA-256 {digest}, but the hub published {blob.name}); "
            f"delete it and load again to download it anew"
        )


def release_cache_dir() -> Path:
    root = os.environ.get("MAMBAOUT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mambaout_jax"
    )
    return Path(root) / "releases"


def release_url(weights: PretrainedWeights) -> str:
    return f"{os.environ.get('MAMBAOUT_RELEASE_URL', RELEASE_URL).rstrip('/')}/{weights.release_file}"


def download_release(weights: PretrainedWeights) -> Path:
    """The authors' release file of ``weights``, from the cache or downloaded (checked) into it."""
    if not weights.release_file:
        raise DownloadError(
            f"{weights.tag}: the authors' GitHub release has no file for it (it holds the five paper models: "
            "mambaout_{femto,kobe,tiny,small,base}); use the Hugging Face Hub source"
        )
    dest = release_cache_dir() / weights.release_file
    recorded = dest.with_name(dest.name + ".sha256")
    url = release_url(weights)
    if dest.exists():
        expected = weights.release_sha256 or (recorded.read_text().strip() if recorded.exists() else None)
        digest = _sha256(dest)
        if expected and digest != expected:
            raise DownloadError(
                f"{weights.tag}: the cached file {dest} is corrupt (SHA-256 {digest}, expected {expected}); "
                "delete it and load again to download it anew"
            )
        if not expected:  # placed there by hand (e.g. the curl command below): record it now
            recorded.write_text(digest + "\n")
        return dest
    fetch = f"curl -L --create-dirs -o {dest} {url}"
    if is_offline():
        raise DownloadError(
            f"{weights.tag}: the authors' release file is not in the cache {dest.parent} and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded. Fetch it once with network access: {fetch} (or unset HF_HUB_OFFLINE)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        digest = _fetch(url, tmp, weights.tag)
        if weights.release_sha256 and digest != weights.release_sha256:
            raise DownloadError(
                f"{weights.tag}: {url} sent a file with SHA-256 {digest}, not the published {weights.release_sha256}; "
                "nothing was cached"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    recorded.write_text(digest + "\n")
    return dest


def _fetch(url: str, out: Path, tag: str) -> str:
    """Stream ``url`` into ``out``; its SHA-256. A body shorter than its Content-Length is an error."""
    h = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(out, "wb") as f:
            length = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                h.update(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{tag}: downloading {url} failed: HTTP {e.code} {e.reason}; nothing was cached") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # refused, reset, timeout, a cut body
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"{tag}: downloading {url} failed (network error: {type(e).__name__}: {reason}); nothing was cached"
        ) from None
    if length is not None and received != int(length):
        raise DownloadError(
            f"{tag}: downloading {url} was interrupted ({received} of {length} bytes); nothing was cached"
        )
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
