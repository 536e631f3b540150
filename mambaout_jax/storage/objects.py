"""Whole-object reads and writes that never leave a partial file, local or in a bucket.

A Cloud Storage object appears only when its upload completes, and replaces the old one whole,
so an upload is already atomic; a local file is written under a temporary name in its folder
and renamed into place. Objects cannot be appended to: ``Mirror`` keeps growing files (metrics,
TensorBoard events) in a local directory and uploads each, whole, when asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mambaout_jax.storage.paths import StorageError, as_path, is_gcs


def read_bytes(path: str | os.PathLike, what: str = "path") -> bytes:
    return as_path(path, what).read_bytes()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a local temporary file; it becomes ``path`` only if the block succeeds."""
    target = as_path(path, what)
    if target.is_dir():
        raise StorageError(f"{path}: is a directory, expected an output file path")
    if is_gcs(path):
        fd, tmp = tempfile.mkstemp(prefix="mambaout_jax-upload-", suffix=".tmp")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=os.fspath(target.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        if is_gcs(path):
            target.write_bytes(Path(tmp).read_bytes())
        else:
            os.replace(tmp, os.fspath(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> None:
    with atomic_output(path, what) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, what: str = "output") -> None:
    write_bytes(path, text.encode(), what)


class Mirror:
    """A local directory whose files are uploaded to ``remote``, each as one whole object.

    Files are written (appended to, rewritten) locally; ``push`` uploads those changed since the
    last push, so what is in the bucket is at most one push behind. ``pull`` fetches an existing
    object first, so a resumed run continues the same file. For a local ``remote`` the directory
    is ``remote`` itself and ``push`` has nothing to do.
    """

    def __init__(self, remote: str | os.PathLike, what: str = "--workdir"):
        self.remote = as_path(remote, what)
        self.is_remote = is_gcs(remote)
        self._spool = tempfile.mkdtemp(prefix="mambaout_jax-mirror-") if self.is_remote else None
        self.local = Path(self._spool) if self._spool else Path(os.fspath(remote))
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self, name: str) -> None:
        if not self.is_remote or not (self.remote / name).exists():
            return
        local = self.local / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes((self.remote / name).read_bytes())
        self._pushed[name] = self._signature(local)

    def push(self) -> list[str]:
        """Upload every file changed since the last push; the names uploaded."""
        if not self.is_remote:
            return []
        uploaded = []
        for local in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name = local.relative_to(self.local).as_posix()
            signature = self._signature(local)
            if self._pushed.get(name) != signature:
                (self.remote / name).write_bytes(local.read_bytes())
                self._pushed[name] = signature
                uploaded.append(name)
        return uploaded

    def close(self) -> None:
        try:
            self.push()
        finally:
            if self._spool:
                shutil.rmtree(self._spool, ignore_errors=True)

    @staticmethod
    def _signature(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
