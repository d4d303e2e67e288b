"""The train state, the optimizer, and the sharded initialisation and train step.

* Parameters are split by a path predicate into a trainable tree (fp32 master weights, optimizer state, optional
  EMA; all in ``TrainState``) and a frozen tree (no optimizer state; a separate, non-donated, non-differentiated
  input of the step, so it stays bit-identical). ``config.train.frozen_param_dtype`` (e.g. "bfloat16") stores the
  frozen tree narrower than the modules' ``param_dtype`` (the modules cast weights to their compute dtype anyway),
  halving the memory of a frozen backbone while the trained weights stay fp32.
* Non-param collections (BatchNorm statistics) live in ``TrainState.mutable``: the step updates them and they are
  checkpointed.
* Everything starts abstract: ``jax.eval_shape`` of the init gives shapes and logical specs, ``parallel/rules``
  turns them into ``NamedSharding``s, and ``jax.jit(init, out_shardings=...)`` (or an Orbax restore into those
  shardings) materialises each shard where it lives: full weights never sit on one host.
* Gradient accumulation is a ``lax.scan`` over micro-batches inside the step: the mean of the micro-batch mean
  gradients is the big-batch mean gradient (equal micro-batch sizes), and the optimizer updates once per step.
  Caveat: BatchNorm in train mode normalises each micro-batch with its own statistics (as PyTorch gradient
  accumulation does), so with BatchNorm the equivalence is that of PyTorch, not of the big batch.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bifrost_jax.parallel.rules import LOGICAL_AXIS_RULES, axis_rules, logical_to_mesh_spec, tree_shardings
from bifrost_jax.train import guard

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: optimizer steps done
    params: Params             # trainable parameters (fp32 master weights)
    opt_state: Any             # optimizer state of the trainable parameters only
    mutable: dict[str, Any]    # non-param collections updated by the step (e.g. {"batch_stats": ...})
    ema_params: Params | None  # EMA of the trainable parameters, or None
    rng: jax.Array             # raw uint32 PRNG key; step i uses fold_in(rng, i)
    bad_steps: jax.Array       # int32: consecutive steps with a non-finite loss/grad norm (not applied; guard.py)
    bad_since: jax.Array       # int32: the first step of that streak (0: none)


# --------------------------------------------------------------------------------------------------------------
# Splitting parameters
# --------------------------------------------------------------------------------------------------------------
def split_params(params: Params, is_trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Params, Params]:
    """(trainable, frozen) nested dicts; a leaf goes to the first if ``is_trainable(path)``."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(tuple(str(p) for p in k))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
    """The full parameter tree from its two parts (they must not overlap)."""
    flat_t = traverse_util.flatten_dict(trainable)
    flat_f = traverse_util.flatten_dict(frozen)
    overlap = flat_t.keys() & flat_f.keys()
    if overlap:
        raise ValueError(f"parameters both trainable and frozen: {sorted('.'.join(k) for k in overlap)}")
    return traverse_util.unflatten_dict({**flat_t, **flat_f})


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------
def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.lr``, then cosine decay to ``lr * end_lr_ratio``."""
    warmup = int(optim.warmup_steps)
    decay = int(optim.decay_steps) if optim.decay_steps >= 0 else max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
                                              decay_steps=warmup + decay, end_value=optim.lr * optim.end_lr_ratio)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """(optax transformation, schedule): global-norm clipping, then AdamW (or SGD) on the schedule."""
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_grad_norm and optim.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_grad_norm))
    if optim.name == "adamw":
        parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                 weight_decay=optim.weight_decay))
    elif optim.name == "sgd":
        parts.append(optax.sgd(schedule))
    else:
        raise ValueError(f"config.optim.name={optim.name!r} is not supported; use 'adamw' or 'sgd'")
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------------------------------------------
# Abstract state, shardings, initialisation
# --------------------------------------------------------------------------------------------------------------
def frozen_param_dtype(name) -> Any:
    """``config.train.frozen_param_dtype`` -> a dtype, or None ("": frozen weights keep their module's
    param_dtype)."""
    if name is None or (isinstance(name, str) and not name):
        return None
    try:
        dtype = jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"config.train.frozen_param_dtype={name!r} is not a dtype (use '', 'bfloat16', "
                         f"'float16' or 'float32')") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config.train.frozen_param_dtype={name!r} is not a floating dtype")
    return dtype


def cast_floating(tree, dtype):
    """Floating leaves of ``tree`` (boxed or not) cast to ``dtype``; integer leaves and ``dtype=None`` unchanged."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split_variables(variables):
    variables = dict(variables)
    if "params" not in variables:
        raise ValueError(f"init_variables must return a 'params' collection, got {sorted(variables)}")
    params = variables.pop("params")
    return params, variables


class StateBuilder:
    """Abstract train state, its shardings, and jitted initialisation for one phase on one mesh."""

    def __init__(self, phase, tx, mesh: Mesh, *, seed: int, ema: bool, rules=LOGICAL_AXIS_RULES,
                 frozen_dtype: Any = "config"):
        self.phase, self.tx, self.mesh, self.seed, self.ema, self.rules = phase, tx, mesh, seed, ema, rules
        if isinstance(frozen_dtype, str) and frozen_dtype == "config":
            # default: the phase config's train.frozen_param_dtype (so `bifrost aot` and benchmarks get it too)
            train_cfg = getattr(getattr(phase, "config", None), "train", None)
            frozen_dtype = train_cfg.get("frozen_param_dtype", "") if train_cfg is not None else ""
        self.frozen_dtype = frozen_param_dtype(frozen_dtype)

        def init_boxed(rng):
            # The same rng for params and the step RNG stream would correlate them; split.
            init_rng, step_rng = jax.random.split(rng)
            params, mutable = _split_variables(phase.init_variables(init_rng))
            trainable, frozen = split_params(params, phase.is_trainable)
            # Frozen weights may be stored narrower than the trained ones (no optimizer reads them): the abstract
            # frozen tree carries this dtype, so ports, init_from restores and resumes all land in it.
            frozen = cast_floating(frozen, self.frozen_dtype)
            if not jax.tree.leaves(trainable):
                raise ValueError(f"phase {phase.name!r}: is_trainable selects no parameter")
            state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                               mutable=mutable, ema_params=trainable if ema else None, rng=step_rng,
                               bad_steps=jnp.zeros((), jnp.int32), bad_since=jnp.zeros((), jnp.int32))
            return state, frozen

        self._init_boxed = init_boxed
        # The key is made outside the mesh context: under a compile-only (AOT topology) mesh it cannot be placed.
        key = jax.random.PRNGKey(seed)
        with axis_rules(mesh, rules):
            boxed = jax.eval_shape(init_boxed, key)
        specs = nn.get_partition_spec(boxed)
        self.state_shardings, self.frozen_shardings = tree_shardings(specs, mesh, rules)
        self.abstract_state, self.abstract_frozen = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
            (self.state_shardings, self.frozen_shardings))
        self.logical_specs = specs

    def init(self) -> tuple[TrainState, Params]:
        """(state, frozen) initialised straight into their shardings."""
        fn = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)),
                     out_shardings=(self.state_shardings, self.frozen_shardings))
        key = jax.random.PRNGKey(self.seed)
        with axis_rules(self.mesh, self.rules):
            return fn(key)

    def init_frozen(self) -> Params:
        """The frozen parameters alone (XLA drops the unused trainable init)."""
        fn = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)[1]), out_shardings=self.frozen_shardings)
        key = jax.random.PRNGKey(self.seed)
        with axis_rules(self.mesh, self.rules):
            return fn(key)

    # Batches ------------------------------------------------------------------------------------------------
    def batch_shardings(self, batch_size: int):
        spec = self.phase.batch_spec(batch_size)
        axes = self.phase.batch_axes()
        return {k: NamedSharding(self.mesh, logical_to_mesh_spec(axes[k], self.rules)) for k in spec}

    def abstract_batch(self, batch_size: int):
        shardings = self.batch_shardings(batch_size)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                for k, v in self.phase.batch_spec(batch_size).items()}


def global_batch(local_batch: dict[str, np.ndarray], abstract_batch: dict[str, jax.ShapeDtypeStruct]):
    """A global sharded batch from this host's part (every host passes its own rows, in process order)."""
    out = {}
    for k, spec in abstract_batch.items():
        if k not in local_batch:
            raise KeyError(f"batch is missing {k!r}; the phase's batch_spec expects {sorted(abstract_batch)}")
        out[k] = jax.make_array_from_process_local_data(spec.sharding, np.asarray(local_batch[k], spec.dtype),
                                                        spec.shape)
    return out


# --------------------------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------------------------
def make_train_step(phase, tx, schedule, *, grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    batch_axes: dict | None = None, max_bad_steps: int = 10):
    """``step(state, frozen, batch) -> (state, metrics)``: one optimizer update over the whole batch; not applied
    when the loss or gradient norm is non-finite (``guard.py``; ``max_bad_steps`` freezes the streak counters)."""
    k = int(grad_accum_steps)
    batch_axes = batch_axes or phase.batch_axes()

    def grads_of(params, frozen, mutable, batch, rng):
        (loss, (metrics, new_mutable)), grads = jax.value_and_grad(phase.loss_fn, has_aux=True)(
            params, frozen, mutable, batch, rng)
        return loss, metrics, new_mutable, grads

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if k == 1:
            loss, metrics, mutable, grads = grads_of(state.params, frozen, state.mutable, batch, rng)
        else:
            def to_micro(name, x):
                if x.shape[0] % k:
                    raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, not divisible by "
                                     f"grad_accum_steps={k}")
                # Micro-batch i takes rows i, i+k, ...: every device keeps contributing to every micro-batch
                # (contiguous row blocks would each sit on a few devices).
                x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
                return nn.with_logical_constraint(x, (None,) + tuple(batch_axes[name]))
            micro = {n: to_micro(n, x) for n, x in batch.items()}

            def body(carry, inputs):
                grad_sum, mutable = carry
                i, mb = inputs
                loss, metrics, mutable, grads = grads_of(state.params, frozen, mutable, mb,
                                                         jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, grad_sum, grads), mutable), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grad_sum, mutable), (losses, metrics) = jax.lax.scan(
                body, (zeros, state.mutable), (jnp.arange(k), micro))
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            loss = jnp.mean(losses)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        grad_norm = optax.tree.norm(grads)
        finite = guard.is_finite_step(loss, grad_norm)
        params, opt_state, mutable, ema = guard.keep_if_not(
            finite, (params, opt_state, mutable, ema), (state.params, state.opt_state, state.mutable, state.ema_params))
        bad_steps, bad_since = guard.bad_step_counters(finite, state.bad_steps, state.bad_since, state.step,
                                                       max_bad_steps)
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       skipped=1.0 - finite.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, mutable=mutable,
                                  ema_params=ema, bad_steps=bad_steps, bad_since=bad_since)
        return new_state, metrics

    return step


def jit_train_step(step_fn, builder: StateBuilder, batch_size: int):
    """The step jitted with in/out shardings and the state donated; frozen weights are neither donated nor
    differentiated."""
    replicated = NamedSharding(builder.mesh, PartitionSpec())
    return jax.jit(step_fn,
                   in_shardings=(builder.state_shardings, builder.frozen_shardings,
                                 builder.batch_shardings(batch_size)),
                   out_shardings=(builder.state_shardings, replicated),
                   donate_argnums=(0,))


def compiled_flops(compiled) -> float | None:
    """FLOPs per device of one compiled call (XLA's cost analysis of the partitioned program), if known."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
