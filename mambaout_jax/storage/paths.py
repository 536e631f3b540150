"""``as_path``: the one way a place a user names becomes a path, and what kind of place it is."""

from __future__ import annotations

import os

from etils import epath

from mambaout_jax.storage import clients
from mambaout_jax.storage.mounts import gcsfuse_mount

GCS = "gs://"


class StorageError(ValueError):
    """A place that cannot be used: the message names it, and the bucket when there is one."""


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(GCS)


def as_path(path: str | os.PathLike, what: str = "path") -> epath.Path:
    """``path`` as an ``epath.Path``: ``gs://`` URLs reach the bucket, anything else is local.

    ``what`` (a flag or config field) names the place in errors. Local paths are kept as given
    (relative ones stay relative), so they behave exactly as ``pathlib`` paths.
    """
    text = os.fspath(path)
    if is_gcs(text):
        if not bucket_of(text):
            raise StorageError(f"{what} {text!r} names no bucket (expected gs://BUCKET/...)")
        clients.configure_clients()
        return epath.Path(text)
    if is_url(text):
        scheme = text.split("://", 1)[0]
        raise StorageError(
            f"{what} {text!r}: {scheme}:// is not supported; give a local path or a Cloud Storage URL (gs://BUCKET/...)"
        )
    return epath.Path(text)


def bucket_of(path: str | os.PathLike) -> str:
    """The bucket of a ``gs://`` URL ('' for a local path)."""
    text = os.fspath(path)
    return text[len(GCS) :].split("/", 1)[0] if is_gcs(text) else ""


def commits_with_file(path: str | os.PathLike, *, mount_table: str | os.PathLike | None = None) -> bool:
    """Whether checkpoints under ``path`` are committed by a ``commit_success.txt`` file.

    orbax commits a local step directory by renaming it from a temporary name; on a bucket it
    writes the step in place and marks it complete with ``commit_success.txt`` (a bucket has no
    directory rename). A path on a gcsfuse mount looks local but is a bucket underneath: gcsfuse
    renames a directory, if at all (``--rename-dir-limit``), as a non-atomic copy of every object,
    so those paths commit with the file too. Writers and readers of a checkpoint both ask here.
    """
    return is_gcs(path) or gcsfuse_mount(path, mount_table=mount_table) is not None
