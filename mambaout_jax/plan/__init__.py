"""Plan TPU training without a TPU: compile train.py's step for a pod slice and read the compiler.

  python -m mambaout_jax.plan --config configs/mambaout_tiny.py --topology v5e:16x16

``plan_training(config, "v5e:16x16")`` returns a ``Plan``; ``format_plan`` / ``plan_to_dict``
render it. See docs/TPU_PLANNING.md.
"""

from mambaout_jax.plan.planner import Plan, plan_training
from mambaout_jax.plan.report import format_plan, plan_to_dict
from mambaout_jax.plan.topology import TopologyError, load_topology

__all__ = ["Plan", "TopologyError", "format_plan", "load_topology", "plan_to_dict", "plan_training"]
