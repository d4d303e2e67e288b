"""What ``bifrost aot`` compiles by name: every training phase's train step, ``flux-forward``, ``generate`` and
``generate-unet``."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bifrost_jax.aot.compile import add_analytic, compile_jitted, make_topology_mesh
from bifrost_jax.aot.generate import generate_target
from bifrost_jax.aot.generate_unet import generate_unet_target
from bifrost_jax.aot.text_decode import text_decode_target
from bifrost_jax.aot.report import AotReport, AotTarget
from bifrost_jax.models import flops as flops_lib
from bifrost_jax.components import flux_component
from bifrost_jax.parallel.rules import abstract_variables, logical_to_mesh_spec
from bifrost_jax.train.registry import PHASES, get_phase
from bifrost_jax.train.state import StateBuilder, jit_train_step, make_optimizer, make_train_step


AotBuilder = Callable[[ml_collections.ConfigDict, Mesh], Any]

# name -> builder (the training phases are compiled by their names too: ``train_step_target``)
AOT_TARGETS: dict[str, AotBuilder] = {"generate": generate_target, "generate-unet": generate_unet_target,
                                      "text-decode": text_decode_target}


def register_aot_target(name: str, builder: AotBuilder) -> None:
    """Make ``bifrost aot --phase NAME`` compile ``builder(config, mesh) -> (jitted_fn, abstract_args)``."""
    if name in AOT_TARGETS and AOT_TARGETS[name] != builder:
        raise ValueError(f"aot target {name!r} is already registered as {AOT_TARGETS[name]}")
    AOT_TARGETS[name] = builder


def _as_target(built: Any) -> AotTarget:
    if isinstance(built, AotTarget):
        return built
    fn, args = built
    return AotTarget(fn=fn, args=tuple(args))


def train_step_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """The training step of ``config.phase`` exactly as ``bifrost train`` builds it."""

    phase = get_phase(config)
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if accum < 1 or batch % accum or (batch // accum) % rows:
        raise ValueError(f"train.batch_size={batch} with grad_accum_steps={accum} does not shard over "
                         f"data*fsdp={rows} devices of this mesh")
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    ema_decay = float(config.optim.ema_decay)
    builder = StateBuilder(phase, tx, mesh, seed=int(config.seed), ema=ema_decay > 0)
    step = jit_train_step(make_train_step(phase, tx, schedule, grad_accum_steps=accum, ema_decay=ema_decay),
                          builder, batch)
    args = (builder.abstract_state, builder.abstract_frozen, builder.abstract_batch(batch))
    return AotTarget(fn=step, args=args, description=f"train step of phase {phase.name!r}, global batch {batch}",
                     analytic=phase.analytic_flops(batch))


def flux_forward_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """FLUX transformer forward + backward of a flow-matching MSE loss (gradients of every parameter).

    Reads the ``flux`` component section (model config, dtypes, ``scan_layers``, ``remat_policy``: the training
    configs' shape), ``config.data.image_size`` (512: (size/16)^2 image tokens), ``config.data.max_text_length``
    (512) and ``config.train.batch_size``."""
    if "flux" not in config:
        raise ValueError("--phase flux-forward: the config has no flux section (configs/flux_aot.py)")
    data_cfg = config.get("data", ml_collections.ConfigDict())
    model = flux_component(config.flux, trainable=True).module
    flux_cfg = model.config
    size = int(data_cfg.get("image_size", 512))
    img_len, txt_len = (size // 16) ** 2, int(data_cfg.get("max_text_length", 512))
    b = int(config.train.batch_size)
    n_axes = len(flux_cfg.axes_dims_rope)
    batch = dict(hidden_states=(b, img_len, flux_cfg.in_channels),
                 encoder_hidden_states=(b, txt_len, flux_cfg.joint_attention_dim),
                 pooled_projections=(b, flux_cfg.pooled_projection_dim), timestep=(b,),
                 img_ids=(img_len, n_axes), txt_ids=(txt_len, n_axes), target=(b, img_len, flux_cfg.output_channels))
    if flux_cfg.guidance_embeds:
        batch["guidance"] = (b,)
    batch_specs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in batch.items()}

    def axes(name, shape):
        return (None,) * len(shape) if name.endswith("_ids") else ("batch",) + (None,) * (len(shape) - 1)

    dummy = model.dummy_inputs(batch=1)
    params = abstract_variables(lambda r: model.init(r, **dummy), mesh)["params"]
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    batch_shardings = {k: NamedSharding(mesh, logical_to_mesh_spec(axes(k, v.shape))) for k, v in
                       batch_specs.items()}
    batch_args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                  for k, v in batch_specs.items()}

    def loss_and_grads(params, batch):
        def loss_fn(p):
            inputs = {k: v for k, v in batch.items() if k != "target"}
            pred = model.apply({"params": p}, **inputs)
            return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["target"]))
        return jax.value_and_grad(loss_fn)(params)

    fn = jax.jit(loss_and_grads, in_shardings=(param_shardings, batch_shardings),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), param_shardings))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))

    analytic = flops_lib.FlopsBreakdown(tuple(flops_lib.flux_transformer_parts(flux_cfg, b, img_len, txt_len,
                                                                                mode="train")),
                                        f"flux-forward, batch {b}")
    return AotTarget(fn=fn, args=(params, batch_args),
                     description=f"FLUX forward+backward, {n_params / 1e9:.2f}B params, batch {b}, "
                                 f"{img_len} image + {txt_len} text tokens", analytic=analytic)


def resolve_target(name: Optional[str], config: ml_collections.ConfigDict) -> tuple[str, AotBuilder]:
    """(display name, builder) for ``--phase NAME`` (default: ``config.phase``)."""

    phase = config.get("phase", "") or ""
    name = name or phase
    if not name:
        raise ValueError("no --phase given and the config sets no phase; targets: "
                         f"{sorted(AOT_TARGETS)} and training phases {sorted(PHASES)}")
    if name in AOT_TARGETS:
        return name, AOT_TARGETS[name]
    if name in PHASES:
        if name != phase:
            raise ValueError(f"--phase {name}: the config is for phase {phase!r}; pass a config of phase "
                             f"{name!r} (its model, data and batch settings are what gets compiled)")
        return f"train step of phase {name!r}", train_step_target
    raise ValueError(f"--phase {name!r} is neither an aot target {sorted(AOT_TARGETS)} nor a training phase "
                     f"{sorted(PHASES)} (targets register with register_aot_target; phases are listed in train/registry.py)")


def compile_target(name: Optional[str], config: ml_collections.ConfigDict, topology: str, *, num_slices: int = 1,
                   hbm_bytes: Optional[int] = None, hlo_path: Optional[str] = None) -> AotReport:
    """Build a registered target for ``config`` on ``topology``'s mesh and compile it."""
    display, builder = resolve_target(name, config)
    mesh = make_topology_mesh(topology, dict(config.mesh), num_slices=num_slices)
    target = _as_target(builder(config, mesh))  # builders enter axis_rules themselves where they need it
    report = compile_jitted(target.fn, target.args, mesh, target=display, topology=topology, hbm_bytes=hbm_bytes,
                            hlo_path=hlo_path)
    add_analytic(report, target.analytic)
    if num_slices > 1:
        report.topology = f"{num_slices} x {topology}"
    if target.description:
        report.notes.insert(0, target.description)
    return report


register_aot_target("flux-forward", flux_forward_target)
