"""Whether a local path lies on a Cloud Storage FUSE (gcsfuse) mount, read from the mount table."""

from __future__ import annotations

import dataclasses
import os
import re

# The mount table to read; tests point it at a file of their own.
MOUNT_TABLE_ENV = "MAMBAOUT_JAX_MOUNT_TABLE"
DEFAULT_MOUNT_TABLE = "/proc/mounts"


@dataclasses.dataclass(frozen=True)
class Mount:
    source: str  # for gcsfuse: the bucket
    mount_point: str
    fstype: str

    @property
    def is_gcsfuse(self) -> bool:
        # gcsfuse mounts with FUSE subtype "gcsfuse" ("fuse.gcsfuse"); older versions and some
        # wrappers show plain "fuse" with the program's name as the source.
        return self.fstype == "fuse.gcsfuse" or (self.fstype == "fuse" and self.source == "gcsfuse")


def _unescape(field: str) -> str:
    """The kernel writes spaces, tabs, newlines and backslashes in mount fields as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mount_table(mount_table: str | os.PathLike | None = None) -> list[Mount]:
    path = mount_table or os.environ.get(MOUNT_TABLE_ENV) or DEFAULT_MOUNT_TABLE
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:  # no /proc (not Linux): nothing is known to be mounted
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return mounts


def mount_of(path: str | os.PathLike, *, mount_table: str | os.PathLike | None = None) -> Mount | None:
    """The mount ``path`` lies on: the one with the longest mount point that contains it."""
    target = os.path.realpath(os.path.abspath(os.fspath(path)))
    best = None
    for mount in read_mount_table(mount_table):
        point = mount.mount_point.rstrip("/") or "/"
        inside = target == point or target.startswith(point if point == "/" else point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def gcsfuse_mount(path: str | os.PathLike, *, mount_table: str | os.PathLike | None = None) -> Mount | None:
    """The gcsfuse mount holding local ``path``, or None (also for ``gs://`` URLs: not a mount)."""
    if "://" in os.fspath(path):
        return None
    mount = mount_of(path, mount_table=mount_table)
    return mount if mount is not None and mount.is_gcsfuse else None
