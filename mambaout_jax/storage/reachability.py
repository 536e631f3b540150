"""A bucket that does not exist, refuses access or cannot be reached, named before anything compiles.

Without this, a mistyped bucket in ``--workdir`` surfaces at the first checkpoint, after
compilation and the first log interval, as a tensorstore error that names an object path.
"""

from __future__ import annotations

import os
import uuid

from mambaout_jax.storage import clients
from mambaout_jax.storage.paths import StorageError, as_path, bucket_of, is_gcs

PROBE_PREFIX = ".mambaout_jax-write-check-"


def _filesystem():
    import fsspec

    return fsspec.filesystem("gs")


def _explain(error: BaseException) -> str | None:
    """What a client error says about access, or None when it is not about access."""
    text = str(error)
    if isinstance(error, PermissionError) or text.startswith(("Forbidden", "Unauthorized")) or getattr(error, "code", None) in (401, 403):
        return "refuses access (HTTP 403/401: the credentials in use may not read or write it)"
    return None


def check_place(what: str, path: str | os.PathLike, *, writable: bool = False, is_file: bool = False) -> None:
    """For a ``gs://`` place: its bucket exists and lets this process read (and write) it.

    Local places are left to their readers, whose errors already name them. The write check
    creates and deletes one empty object in the folder ``path`` (``is_file``: next to it).
    """
    as_path(path, what)  # rejects other URL schemes and a URL without a bucket; configures the clients
    if not is_gcs(path):
        return
    bucket = bucket_of(path)
    endpoint = clients.emulator_url() or "https://storage.googleapis.com"
    fs = _filesystem()
    try:
        fs.info(bucket)
        if writable:
            folder = os.fspath(path).rstrip("/")
            if is_file:
                folder = folder.rsplit("/", 1)[0]
            probe = f"{folder}/{PROBE_PREFIX}{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except FileNotFoundError:
        raise StorageError(f"{what} {os.fspath(path)!r}: the bucket {bucket!r} does not exist") from None
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - each client raises its own kinds; all of them end the run here
        reason = _explain(e) or f"cannot be reached at {endpoint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise StorageError(f"{what} {os.fspath(path)!r}: the bucket {bucket!r} {reason}") from None
