"""The settings the Cloud Storage clients share, so that one endpoint variable moves them all.

Three clients touch a bucket in a run: gcsfs (through ``etils.epath``: listings, small files,
metrics), tensorstore (orbax's array writes and reads) and the google-cloud-cpp client inside
array_record (TFDS ArrayRecord reads). Against the real service each finds its endpoint and
credentials itself (on a TPU VM, from the metadata server). Against an emulator each wants its
own variable; ``STORAGE_EMULATOR_HOST`` (the variable Google's Python clients read) is enough
here: the others are derived from it unless set, and the emulator is reached anonymously.
"""

from __future__ import annotations

import os
from typing import MutableMapping

EMULATOR_HOST = "STORAGE_EMULATOR_HOST"  # google-cloud-storage, gcsfs
TENSORSTORE_URL = "TENSORSTORE_GCS_HTTP_URL"  # tensorstore (orbax's arrays)
CPP_EMULATOR = "CLOUD_STORAGE_EMULATOR_ENDPOINT"  # google-cloud-cpp (array_record)
TENSORSTORE_TOKEN = "GOOGLE_AUTH_TOKEN_FOR_TESTING"  # tensorstore: a fixed bearer token, no credential lookup


def emulator_url(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The emulator's ``http://host:port`` when the run is pointed at one, else None."""
    host = environ.get(EMULATOR_HOST, "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure_clients(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make every client use one backend and, under an emulator, the emulator. Idempotent.

    ``etils.epath`` would route ``gs://`` through ``tf.io.gfile`` whenever TensorFlow is importable
    (it is, in the test extra and on many TPU VMs); pinning gcsfs keeps one backend, which honours
    the endpoint variables, wherever the code runs. ``EPATH_USE_TF=true`` set by a user still wins.
    """
    environ.setdefault("EPATH_USE_TF", "false")
    url = emulator_url(environ)
    if url is None:
        return
    environ.setdefault(TENSORSTORE_URL, url)
    environ.setdefault(CPP_EMULATOR, url)
    environ.setdefault(TENSORSTORE_TOKEN, "emulator")
    import fsspec

    # The emulator takes anonymous requests (google-cloud-storage does the same under the
    # variable); the credential chain would otherwise probe for a metadata server first.
    fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")
    # gcsfs's default class asks a gRPC control plane for the bucket's layout before reads and
    # writes; emulators speak only the JSON API, so every call would wait for that to fail.
    fsspec.register_implementation("gs", "gcsfs.core.GCSFileSystem", clobber=True)


configure_clients()
