#!/usr/bin/env python
"""Train MambaOut on a device mesh (one CPU, a GPU node, a TPU pod slice, a multi-node cluster).

  python train.py --workdir runs/digits                      # built-in default: digits, a few minutes
  python train.py --config configs/mambaout_tiny.py --workdir /ckpt/tiny \\
      --config.data.dir=/data/tfds --config.grad_accum_steps=4   # the recipe's 4096 as 4 x 1024

Running the same command again with the same --workdir resumes from its latest checkpoint. On a
multi-host slice or cluster, every host runs the same command with --distributed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "digits.py")

try:  # ml_collections applies --config.* overrides here already; a typo fails now, not mid-run
    _CONFIG = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Python config file (configs/*.py).", lock_config=True
    )
except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip("'")
    sys.exit(f"error: bad --config override: {message}")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go.", required=True)
_RESUME = flags.DEFINE_string("resume", None, "Another run's workdir to continue from (when --workdir has no checkpoint).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto-detected on TPU/SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (auto-detected on TPU/SLURM).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (auto-detected on TPU/SLURM).")


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file operation at INFO

    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )
    from mambaout_jax.convert import CheckpointError
    from mambaout_jax.train.mesh import ShardingConfigError
    from mambaout_jax.train.recipe import ConfigError
    from mambaout_jax.train.trainer import TrainingDiverged, train

    try:
        _CONFIG.value.model  # ml_collections reports a config file that failed to load on first use
    except Exception as e:  # noqa: BLE001 - a missing file, or any error raised while executing it
        print(f"error: could not load --config: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        result = train(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)
    except (ConfigError, ShardingConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
