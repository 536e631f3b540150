"""Plan a training run for a TPU slice on a machine without a TPU.

  python -m mambaout_jax.plan --config configs/mambaout_tiny.py --topology v5e:16x16
  python -m mambaout_jax.plan --config configs/mambaout_base.py --topology v5p-128 \\
      --config.grad_accum_steps=2 --search-batch --json base_v5p.json
  python -m mambaout_jax.plan --config configs/mambaout_tiny.py --topology v5e:2x2 \\
      --config.batch_size=64 --breakdown=15        # where the train step's bytes and FLOPs go

Compiles train.py's own train and eval steps for the slice (libtpu, compile-only) and prints
per-chip memory against HBM, FLOPs, every collective and a roofline estimate of speed. Exit status:
0 the train step fits, 1 it does not (the plan is still printed), 2 bad config or topology.

``--breakdown=N`` compiles the train step only and prints, instead of the plan, its bytes accessed
and FLOPs per image by model part and its N largest instructions by each (``plan/breakdown.py``);
``--json`` then writes the per-part totals.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax

if "JAX_PLATFORMS" not in os.environ:
    # Only compiling: stay off any local accelerator (a TPU VM's chips may be busy training).
    jax.config.update("jax_platforms", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mambaout_jax.plan.breakdown import breakdown_to_dict, format_breakdown, train_step_breakdown  # noqa: E402
from mambaout_jax.plan.planner import plan_training  # noqa: E402
from mambaout_jax.plan.report import format_plan, plan_to_dict  # noqa: E402
from mambaout_jax.plan.topology import TopologyError  # noqa: E402
from mambaout_jax.train.mesh import ShardingConfigError  # noqa: E402
from mambaout_jax.train.recipe import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice: v5e:16x16, v4:2x2x4, v5p:4x4x4, v6e:16x16, or v5e-256, v4-32, v5p-128, v6e-256.",
    required=True,
)
_JSON = flags.DEFINE_string("json", None, "Also write the whole plan as JSON to this file.")
_SEARCH_BATCH = flags.DEFINE_bool(
    "search_batch", False, "Find the largest per-chip batch that fits (a few more compiles)."
)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 1 << 16, "Upper limit of --search_batch, per chip.")
_EVAL = flags.DEFINE_bool("eval", True, "Also compile the eval step (--noeval skips it).")
_BREAKDOWN = flags.DEFINE_integer(
    "breakdown", 0, "Instead of the plan: the train step's bytes and FLOPs by model part, and its N largest instructions.",
    lower_bound=0,
)


def main(argv) -> int:
    del argv

    config = _CONFIG.value
    if config is None:
        print("error: --config is required (e.g. --config configs/mambaout_tiny.py)", file=sys.stderr)
        return 2
    try:
        config.model  # ml_collections reports a config file that failed to load on first use
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _BREAKDOWN.value:
        return _breakdown(config)
    try:
        plan = plan_training(
            config,
            _TOPOLOGY.value,
            search_batch=_SEARCH_BATCH.value,
            include_eval=_EVAL.value,
            max_batch=_MAX_BATCH.value,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except (ConfigError, ShardingConfigError, TopologyError, ValueError) as e:  # ValueError: a bad model field
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(plan_to_dict(plan), indent=1))
    return 0 if plan.train.compiled.fits else 1


def _breakdown(config) -> int:
    try:
        result = train_step_breakdown(config, _TOPOLOGY.value)
    except (ConfigError, ShardingConfigError, TopologyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: the train step does not fit in HBM, nothing to break down: {str(e).strip()[:500]}", file=sys.stderr)
        return 1
    print(format_breakdown(result, _BREAKDOWN.value))
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(breakdown_to_dict(result), indent=1))
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad ``--config.<field>`` override as a one-line error (exit 2).

    The planner's own flags take dashes or underscores (``--search-batch`` = ``--search_batch``).
    """
    argv = [_underscored(a) if a.startswith("--") and not a.startswith("--config") else a for a in argv]
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a missing --topology, a config file that does not load, ...
        print(f"error: {e}  (--help for usage)", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' override errors
        message = str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip("'")
        print(f"error: bad --config override: {message}", file=sys.stderr)
        sys.exit(2)


def _underscored(arg: str) -> str:
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
