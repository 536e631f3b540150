"""The compiled side of a run, built once from a config and a mesh.

``TrainProgram`` holds the model graph, optimizer, shardings and the jitted train/eval steps.
``train.py`` runs it and ``mambaout_jax.plan`` lowers the very same object for a TPU topology, so
what is planned is what is trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from mambaout_jax.data.preprocessing import EvalPreprocessing, resolve_eval_preprocessing
from mambaout_jax.models.factory import abstract_model, model_param_shapes
from mambaout_jax.models.layers import resolve_conv_impl, resolve_depthwise_impl
from mambaout_jax.models.registry import get_model_spec
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train import recipe
from mambaout_jax.train.optim import lr_schedule, make_optimizer
from mambaout_jax.train.recipe import ConfigError
from mambaout_jax.train.steps import ModelFn, TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class EvalProgram:
    """The jitted eval step of a model on a mesh: ``eval_step(params, batch) -> sums``."""

    mesh: Mesh
    num_classes: int
    preprocessing: EvalPreprocessing  # how images are prepared for it: resize, crop, normalisation
    param_shardings: dict[str, NamedSharding]
    eval_step: Any


def build_eval_program(
    model: str,
    num_classes: int,
    mesh: Mesh,
    *,
    preprocessing: EvalPreprocessing | None = None,
    compute_dtype=jnp.float32,
    dw_conv_impl: str = "auto",
    sharding: str = "data_parallel",
) -> EvalProgram:
    """The eval step of ``model``; its input is prepared by ``preprocessing`` (default: the model's)."""
    spec = get_model_spec(model)
    preprocessing = preprocessing or resolve_eval_preprocessing(spec)
    dw_impl, conv_impl = conv_impls_for(mesh, dw_conv_impl)
    module = abstract_model(spec.name, num_classes, dtype=compute_dtype, dw_conv_impl=dw_impl, conv_impl=conv_impl)
    shapes = model_param_shapes(spec.name, num_classes)
    p_shard = mesh_lib.param_shardings(shapes, mesh, sharding)
    step = make_eval_step(
        ModelFn(module, train=False),
        num_classes=num_classes,
        mean=preprocessing.mean,
        std=preprocessing.std,
        compute_dtype=compute_dtype,
    )
    b = mesh_lib.batch_sharding(mesh)
    eval_batch = {"image": b, "label": b, "mask": b}
    jitted = jax.jit(step, in_shardings=(p_shard, eval_batch), out_shardings=mesh_lib.replicated(mesh))
    return EvalProgram(
        mesh=mesh, num_classes=num_classes, preprocessing=preprocessing, param_shardings=p_shard, eval_step=jitted
    )


@dataclasses.dataclass
class TrainProgram:
    config: Any
    mesh: Mesh
    steps_per_epoch: int
    micro_batch_size: int
    model_shapes: dict[str, tuple[int, ...]]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    param_shardings: dict[str, NamedSharding]
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_step: Any  # jitted (state, batch) -> (state, metrics); state donated
    eval: EvalProgram

    @property
    def total_steps(self) -> int:
        c = self.config
        return (c.epochs + c.cooldown_epochs) * self.steps_per_epoch

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the train state: for restoring and for planning."""
        params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in self.model_shapes.items()}
        shapes = jax.eval_shape(lambda p: self._init_state(p), params)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def _init_state(self, params: Mapping[str, jax.Array]) -> TrainState:
        params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
        ema = dict(params) if self.config.ema_decay else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema_params=ema)

    def init_state(self, params: Mapping[str, np.ndarray | jax.Array]) -> TrainState:
        """A fresh train state around ``params`` (flat contract dict), laid out on the mesh."""
        params = jax.device_put(dict(params), self.param_shardings)
        return jax.jit(self._init_state, out_shardings=self.state_shardings)(params)


def conv_impls_for(mesh: Mesh, dw_conv_impl: str = "auto") -> tuple[str, str]:
    """The convolution forms for the devices of ``mesh`` ('auto' resolved by *their* platform).

    The mesh's platform, not the host's default backend, decides: a TPU slice planned from a CPU
    host gets the TPU forms.
    """
    platform = mesh.devices.flat[0].platform
    return resolve_depthwise_impl(dw_conv_impl, platform), resolve_conv_impl("auto", platform)


def build_program(
    config, mesh: Mesh, *, steps_per_epoch: int, dw_conv_impl: str | None = None
) -> TrainProgram:
    """Validate the config against the mesh, then build and jit everything (nothing compiles yet)."""
    spec = get_model_spec(config.model)  # unknown model -> clear error
    if config.num_classes <= 0:
        raise ConfigError(f"num_classes must be positive for training, got {config.num_classes}")
    micro = mesh_lib.check_global_batch(config.batch_size, mesh, config.grad_accum_steps)
    augmentation = recipe.batch_augmentation(config)
    recipe.check_mix_groups(augmentation, micro)
    dtype = recipe.compute_dtype(config)
    preprocessing = recipe.eval_preprocessing(config)
    dw_conv_impl = dw_conv_impl or config.dw_conv_impl

    dw_impl, conv_impl = conv_impls_for(mesh, dw_conv_impl)
    model = abstract_model(
        spec.name, config.num_classes, drop_path_rate=config.drop_path_rate, dtype=dtype, dw_conv_impl=dw_impl,
        conv_impl=conv_impl,
    )  # fmt: skip
    shapes = model_param_shapes(spec.name, config.num_classes)
    schedule = lr_schedule(
        base_lr=config.lr,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        cooldown_epochs=config.cooldown_epochs,
        steps_per_epoch=steps_per_epoch,
    )
    tx = make_optimizer(
        schedule,
        shapes,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        grad_clip_norm=config.grad_clip_norm or None,
    )

    p_shard = mesh_lib.param_shardings(shapes, mesh, config.sharding)
    rep = mesh_lib.replicated(mesh)
    abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    opt_shapes = jax.eval_shape(tx.init, abstract_params)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, p_shard, transform_non_params=lambda _: rep)
    state_shardings = TrainState(
        step=rep, params=p_shard, opt_state=opt_shard, ema_params=p_shard if config.ema_decay else None
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)

    train_step = make_train_step(
        ModelFn(model, train=True),
        tx,
        schedule,
        augmentation=augmentation,
        num_classes=config.num_classes,
        mean=preprocessing.mean,
        std=preprocessing.std,
        mesh=mesh,
        param_specs={name: s.spec for name, s in p_shard.items()},
        seed=config.seed,
        grad_accum_steps=config.grad_accum_steps,
        micro_batch=recipe.micro_batch(config, mesh.devices.flat[0].platform),
        compute_dtype=dtype,
        ema_decay=config.ema_decay or None,
    )
    train_batch = {"image": batch_sharding, "label": batch_sharding}
    return TrainProgram(
        config=config,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        micro_batch_size=micro,
        model_shapes=shapes,
        tx=tx,
        schedule=schedule,
        param_shardings=p_shard,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        train_step=jax.jit(
            train_step, in_shardings=(state_shardings, train_batch), out_shardings=(state_shardings, rep), donate_argnums=0
        ),
        eval=build_eval_program(
            spec.name,
            config.num_classes,
            mesh,
            preprocessing=preprocessing,
            compute_dtype=dtype,
            dw_conv_impl=dw_conv_impl,
            sharding=config.sharding,
        ),
    )
