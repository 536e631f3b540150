"""Every place a user names, local or in a Cloud Storage bucket, through one path type.

Paths are ``etils.epath.Path`` (what orbax uses): a local path behaves as a ``pathlib`` path, a
``gs://bucket/...`` URL reaches the bucket through gcsfs, and orbax's tensorstore writes arrays
there natively. This layer sits just above ``models``: ``convert``, ``data`` and ``train`` take
their paths from here, and it imports nothing of the project.

- ``paths``: ``as_path`` (the one constructor), URL checks, how a checkpoint directory commits.
- ``mounts``: whether a local-looking path lies on a Cloud Storage FUSE (gcsfuse) mount.
- ``objects``: whole-object reads and atomic writes, and ``Mirror``, a local directory uploaded
  file by file (objects cannot be appended to).
- ``reachability``: a bucket that does not exist or refuses access, named before any compilation.
- ``clients``: the endpoint and credential settings the clients share, so a run pointed at an
  emulator (``STORAGE_EMULATOR_HOST``) points every client there.
"""

from mambaout_jax.storage.clients import configure_clients
from mambaout_jax.storage.mounts import Mount, gcsfuse_mount
from mambaout_jax.storage.objects import Mirror, atomic_output, read_bytes, write_bytes, write_text
from mambaout_jax.storage.paths import StorageError, as_path, bucket_of, commits_with_file, is_gcs, is_url
from mambaout_jax.storage.reachability import check_place

__all__ = [
    "Mirror",
    "Mount",
    "StorageError",
    "as_path",
    "atomic_output",
    "bucket_of",
    "check_place",
    "commits_with_file",
    "configure_clients",
    "gcsfuse_mount",
    "is_gcs",
    "is_url",
    "read_bytes",
    "write_bytes",
    "write_text",
]
