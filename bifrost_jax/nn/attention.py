"""The one attention entry point of bifrost-jax, dispatching to XLA, cuDNN flash or Pallas splash attention.

``dot_product_attention(q, k, v, ...)`` with q (B, L, H, D), k/v (B, S, K, D), K dividing H (grouped-query
attention without repeating K/V in memory). Softmax always in float32. Query rows that see no key at all produce
zeros, never NaN, in every implementation.

Masks come in two forms:
- a boolean array broadcastable to (B, H, L, S) (True = may attend): any pattern, but only "xla" and "cudnn" can
  take it (splash kernels need the pattern at trace time, not as data);
- an :class:`AttentionMask`: the structured masks bifrost uses (none, causal, the Bifrost text-causal +
  image-bidirectional block, query/key padding). Every implementation takes it, so use it where splash should apply.

``implementation``:
- "xla": einsum + fp32 softmax; works everywhere, takes arbitrary masks and additive biases.
- "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU flash attention; bf16/fp16, head_dim a
  multiple of 8 up to 128). Native GQA; a causal-only mask becomes ``is_causal``, other masks a dense mask.
- "splash": Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) on TPU: static mask
  pattern (full / causal / numpy) and padding through segment ids; native GQA (the MHA kernel maps query head h to
  key head h // (H/K)); sequences padded up to multiples of 128. Mosaic cannot contract bf16 operands at fp32
  precision, so a global ``jax_default_matmul_precision="highest"`` must not be active when compiling it for bf16. Under a mesh it runs inside ``shard_map`` over
  batch and heads (the mesh axes of the logical "batch" and "act_heads" names), because a Pallas call cannot be
  partitioned by XLA.
- "auto" or None: by the platform being compiled for (:func:`target_platform`): splash on TPU when there is no
  additive bias, no dense mask, head_dim is a multiple of 128 and L, S are multiples of 128; cuDNN on GPU for
  bf16/fp16 with head_dim <= 128 and a multiple of 8; else XLA. :func:`choose_implementation` says which and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bifrost_jax.parallel.rules import LOGICAL_AXIS_RULES

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash tiles are multiples of the TPU lane width


# --------------------------------------------------------------------------------------------------------------
# Structured masks
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """A boolean attention mask by its structure: query l may see key s iff

        static(l, s)  and  q_valid[b, l]  and  kv_valid[b, s]

    with ``static`` = everything, or causal (``s <= l + S - L``: bottom-right aligned, the KV-cache convention),
    or'ed with the ``full_suffix`` block (the last n queries see the last n keys in both directions).
    The Bifrost generation sequence (docs/design.md §4.4) is ``AttentionMask(causal=True, full_suffix=256, q_valid=valid,
    kv_valid=valid)``: causal text, bidirectional image block, nothing attends to pads, pad rows give zeros.
    """
    causal: bool = False
    full_suffix: int = 0
    q_valid: Optional[jax.Array] = None   # (B, L) bool; None = all valid
    kv_valid: Optional[jax.Array] = None  # (B, S) bool; None = all valid

    @classmethod
    def padded_self_attention(cls, valid, *, causal: bool = False, full_suffix: int = 0) -> "AttentionMask":
        """Self-attention over a padded batch: ``valid`` (B, L), True (or 1) = real token."""
        valid = jnp.asarray(valid).astype(bool)
        return cls(causal=causal, full_suffix=full_suffix, q_valid=valid, kv_valid=valid)

    def static(self, q_len: int, kv_len: int) -> Optional[np.ndarray]:
        """The (L, S) data-independent part, or None when it allows everything."""
        if not self.causal:
            return None  # a suffix block on top of "everything" is still everything
        q_ids = np.arange(q_len)[:, None]
        kv_ids = np.arange(kv_len)[None, :]
        allowed = kv_ids <= q_ids + (kv_len - q_len)
        if self.full_suffix:
            n = self.full_suffix
            allowed = allowed | ((q_ids >= q_len - n) & (kv_ids >= kv_len - n))
        return allowed

    def dense(self, q_len: int, kv_len: int) -> jax.Array:
        """The equivalent boolean array, (B or 1, 1, L, S)."""
        static = self.static(q_len, kv_len)
        mask = jnp.ones((1, 1, q_len, kv_len), bool) if static is None else jnp.asarray(static)[None, None]
        if self.q_valid is not None:
            mask = mask & jnp.asarray(self.q_valid).astype(bool)[:, None, :, None]
        if self.kv_valid is not None:
            mask = mask & jnp.asarray(self.kv_valid).astype(bool)[:, None, None, :]
        return mask

    def row_has_key(self, q_len: int, kv_len: int) -> Optional[jax.Array]:
        """(B or 1, L) bool: whether each query row sees any key; None when every row does."""
        static = self.static(q_len, kv_len)
        rows = None
        if static is not None and not static.any(axis=1).all():
            rows = jnp.asarray(static.any(axis=1))[None]
        if self.kv_valid is not None:
            kv = jnp.asarray(self.kv_valid).astype(jnp.float32)
            seen = (jnp.any(kv > 0, axis=-1, keepdims=True) if static is None
                    else jnp.einsum("bs,ls->bl", kv, jnp.asarray(static, jnp.float32)) > 0)
            seen = jnp.broadcast_to(seen, (kv.shape[0], q_len))
            rows = seen if rows is None else rows & seen
        if self.q_valid is not None:
            q = jnp.asarray(self.q_valid).astype(bool)
            rows = q if rows is None else rows & q
        return rows


jax.tree_util.register_dataclass(AttentionMask, data_fields=["q_valid", "kv_valid"],
                                 meta_fields=["causal", "full_suffix"])

MaskLike = Union[None, jax.Array, AttentionMask]


# --------------------------------------------------------------------------------------------------------------
# Which platform we compile for, and which implementation that allows
# --------------------------------------------------------------------------------------------------------------
_OPTIONS: dict = {"platform": None, "splash_interpret": False}


@contextlib.contextmanager
def attention_options(*, platform: Optional[str] = None, splash_interpret: Optional[bool] = None) -> Iterator[None]:
    """Override, while tracing, the target platform seen by "auto" (e.g. "tpu" to trace TPU code on a CPU host
    without a TPU mesh) and run splash kernels in Pallas interpret mode (numerics tests on CPU)."""
    saved = dict(_OPTIONS)
    if platform is not None:
        _OPTIONS["platform"] = platform
    if splash_interpret is not None:
        _OPTIONS["splash_interpret"] = bool(splash_interpret)
    try:
        yield
    finally:
        _OPTIONS.clear()
        _OPTIONS.update(saved)


def _normalise_platform(name: str) -> str:
    name = name.lower()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def target_platform() -> str:
    """The platform being compiled for: an :func:`attention_options` override, else the platform of the mesh in
    context (``jax.set_mesh``; a mesh over TPU topology devices when compiling ahead of time on a CPU host), else
    the default backend."""
    if _OPTIONS["platform"]:
        return _normalise_platform(_OPTIONS["platform"])
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and getattr(device, "platform", None):
            return _normalise_platform(device.platform)
    return _normalise_platform(jax.default_backend())


def default_implementation() -> str:
    return "auto"


def _splash_blockers(q_shape, kv_shape, mask, bias) -> list[str]:
    reasons = []
    if bias is not None:
        reasons.append("an additive bias")
    if mask is not None and not isinstance(mask, AttentionMask):
        reasons.append("a dense boolean mask (pass an AttentionMask)")
    if q_shape[-1] % 128:
        reasons.append(f"head_dim {q_shape[-1]} is not a multiple of 128")
    if q_shape[1] % SPLASH_BLOCK or kv_shape[1] % SPLASH_BLOCK:
        reasons.append(f"sequence lengths L={q_shape[1]}, S={kv_shape[1]} are not multiples of {SPLASH_BLOCK}")
    return reasons


def _cudnn_blockers(q_shape, dtype) -> list[str]:
    reasons = []
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        reasons.append(f"dtype {jnp.dtype(dtype).name} (cuDNN flash takes bf16/fp16)")
    d = q_shape[-1]
    if d % 8 or d > 128:
        reasons.append(f"head_dim {d} (cuDNN flash takes multiples of 8 up to 128)")
    return reasons


def choose_implementation(q, k, *, mask: MaskLike = None, bias=None, implementation: Optional[str] = None,
                          platform: Optional[str] = None) -> tuple[str, str]:
    """(implementation, why) that ``dot_product_attention`` uses for these arguments."""
    implementation = implementation or default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation, "requested"
    platform = _normalise_platform(platform) if platform else target_platform()
    if platform == "tpu":
        blockers = _splash_blockers(q.shape, k.shape, mask, bias)
        return ("xla", "tpu, splash not used: " + "; ".join(blockers)) if blockers else ("splash", "tpu")
    if platform == "gpu":
        blockers = _cudnn_blockers(q.shape, q.dtype)
        return ("xla", "gpu, cuDNN not used: " + "; ".join(blockers)) if blockers else ("cudnn", "gpu")
    return "xla", f"platform {platform}"


# --------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------
def dot_product_attention(q, k, v, *, mask: MaskLike = None, bias: Optional[jax.Array] = None,
                          scale: Optional[float] = None, implementation: Optional[str] = None):
    """Attention over (B, L, H, D) queries and (B, S, K, D) keys/values; returns (B, L, H, D).

    mask: an :class:`AttentionMask`, or a boolean array broadcastable to (B, H, L, S); True = may attend.
    bias: additive float bias broadcastable to (B, H, L, S) ("xla" and "cudnn" only).
    """
    b, l, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kh} key/value heads")
    scale = (1.0 / d ** 0.5) if scale is None else scale
    impl, _ = choose_implementation(q, k, mask=mask, bias=bias, implementation=implementation)
    if impl == "splash":
        blockers = [r for r in _splash_blockers(q.shape, k.shape, mask, bias)
                    if r.startswith(("an additive", "a dense"))]  # other limits are handled by padding
        if blockers:
            raise ValueError(f"attention: splash cannot take {' and '.join(blockers)}; use implementation='xla'")
        return _splash_attention(q, k, v, mask, scale)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias, scale)
    return _xla_attention(q, k, v, mask, bias, scale)


def _xla_attention(q, k, v, mask, bias, scale):
    b, l, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if isinstance(mask, AttentionMask):
        mask = mask.dense(l, s)
    groups = h // kh
    qg = q.reshape(b, l, kh, groups, d)
    logits = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], h) + bias.shape[2:]) if bias.shape[1] == 1 else bias
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kh, groups, *bias.shape[2:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], h) + mask.shape[2:]) if mask.shape[1] == 1 else mask
        mask = mask.reshape(mask.shape[0], kh, groups, *mask.shape[2:])
        logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # rows with no visible key: zeros rather than a uniform average over masked keys
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v.dtype), v)
    return out.reshape(b, l, h, d)


def _zero_rows(out, rows):
    """Zero the (B, L, H, D) output where ``rows`` (B|1, L) or (B|1, H|1, L) is False."""
    if rows is None:
        return out
    rows = rows[:, :, None] if rows.ndim == 2 else jnp.swapaxes(rows, 1, 2)
    return jnp.where(rows[..., None], out, jnp.zeros((), out.dtype))


# --------------------------------------------------------------------------------------------------------------
# cuDNN
# --------------------------------------------------------------------------------------------------------------
def _cudnn_attention(q, k, v, mask, bias, scale):
    l, s = q.shape[1], k.shape[1]
    is_causal, dense, rows = False, None, None
    if isinstance(mask, AttentionMask):
        if (mask.causal and not mask.full_suffix and mask.q_valid is None and mask.kv_valid is None and l == s):
            is_causal = True  # cuDNN skips the masked tiles instead of reading a mask
        else:
            dense = mask.dense(l, s)
            rows = mask.row_has_key(l, s)
    elif mask is not None:
        dense = mask.astype(bool)
        rows = jnp.any(dense, axis=-1)  # (B|1, H|1, L|1)
    # JAX's cuDNN path wants the full (L, S) in a mask or bias (a key-padding mask (B, 1, 1, S) is refused:
    # "Bias must have same seq length as QKV"); broadcasting the leading dims is allowed
    if dense is not None:
        dense = jnp.broadcast_to(dense, dense.shape[:-2] + (l, s))
    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(q.dtype), bias.shape[:-2] + (l, s))
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=scale, is_causal=is_causal,
                                       implementation="cudnn")
    # cuDNN averages over masked keys on rows that see none; the contract is zeros
    return _zero_rows(out, rows)


# --------------------------------------------------------------------------------------------------------------
# Pallas splash attention (TPU)
# --------------------------------------------------------------------------------------------------------------
def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int, largest: int = 512) -> int:
    """The largest tile (<= ``largest``, a multiple of 128) dividing ``n`` (itself a multiple of 128)."""
    for size in (1024, 512, 256, 128):
        if size <= largest and n % size == 0:
            return size
    raise AssertionError(n)


def _splash_mask(mask: Optional[AttentionMask], l: int, s: int, lp: int, sp: int):
    """The static splash mask over the padded (lp, sp) grid (padded queries see padded keys: never an empty row)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    static = mask.static(l, s) if mask is not None else None
    if static is None:
        return sm.FullMask((lp, sp))
    if mask.causal and not mask.full_suffix and (sp - lp) == (s - l):
        # bottom-right causal on the padded grid still lets padded rows see the padded keys at their diagonal
        return sm.CausalMask((lp, sp), offset=s - l)
    padded = np.zeros((lp, sp), bool)
    padded[:l, :s] = static
    padded[l:, s:] = True
    return sm.NumpyMask(padded)


def _segment_ids(mask: Optional[AttentionMask], b: int, l: int, s: int, lp: int, sp: int):
    """(q, kv) int32 segment ids (B, lp) / (B, sp): 1 = valid, 0 = invalid, 2 = sequence padding; None if not
    needed. Query validity only enters when key validity does too (self-attention padding: an invalid query then
    sees the invalid keys, its own among them, so no row is empty); invalid query rows are zeroed afterwards."""
    q_valid = mask.q_valid if mask is not None else None
    kv_valid = mask.kv_valid if mask is not None else None
    if kv_valid is None and lp == l and sp == s:
        return None
    q_ids = (jnp.ones((b, l), jnp.int32) if q_valid is None or kv_valid is None
             else jnp.broadcast_to(jnp.asarray(q_valid).astype(jnp.int32), (b, l)))
    kv_ids = (jnp.ones((b, s), jnp.int32) if kv_valid is None
              else jnp.broadcast_to(jnp.asarray(kv_valid).astype(jnp.int32), (b, s)))
    q_ids = jnp.pad(q_ids, ((0, 0), (0, lp - l)), constant_values=2)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)), constant_values=2)
    return q_ids, kv_ids


def _mesh_axes_for(logical: str, size: int, mesh) -> Optional[tuple[str, ...]]:
    """The mesh axes the rules give ``logical`` that exist in ``mesh``, if they divide ``size``; else None."""
    rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    if spec is None:
        return None
    axes = tuple(a for a in ((spec,) if isinstance(spec, str) else spec) if a in mesh.axis_names)
    n = math.prod(mesh.shape[a] for a in axes)
    if not axes or n == 1 or size % n:
        return None
    return axes


def _splash_attention(q, k, v, mask: Optional[AttentionMask], scale):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.sharding import PartitionSpec as P

    b, l, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    lp, sp = _pad_to(l, SPLASH_BLOCK), _pad_to(s, SPLASH_BLOCK)
    seg = _segment_ids(mask, b, l, s, lp, sp)
    static_mask = _splash_mask(mask, l, s, lp, sp)
    interpret = _OPTIONS["splash_interpret"]
    bq, bkv = _block(lp), _block(sp)
    block_sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                    block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # splash does not scale the logits: fold the scale into q (in fp32, as the xla path does to the logits)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def local(q, k, v, *seg_ids):
        heads = q.shape[2]
        kernel = splash.make_splash_mha(splash.MultiHeadMask([static_mask] * heads), block_sizes=block_sizes,
                                        head_shards=1, q_seq_shards=1, interpret=interpret)
        qt = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, lp - l), (0, 0)))
        kt = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        vt = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
        if seg_ids:
            out = jax.vmap(lambda a, b_, c, qs, ks: kernel(a, b_, c, segment_ids=splash.SegmentIds(qs, ks)))(
                qt, kt, vt, *seg_ids)
        else:
            out = jax.vmap(kernel)(qt, kt, vt)
        return jnp.swapaxes(out[:, :, :l], 1, 2)

    seg_args = tuple(seg) if seg is not None else ()
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        out = local(q, k, v, *seg_args)
    else:
        batch_axes = _mesh_axes_for("batch", b, mesh)
        head_axes = _mesh_axes_for("act_heads", h, mesh)
        if head_axes is not None and kh % math.prod(mesh.shape[a] for a in head_axes):
            # too few key/value heads to split: give every query head its own copy (plain MHA)
            k, v = jnp.repeat(k, h // kh, axis=2), jnp.repeat(v, h // kh, axis=2)
        qkv_spec = P(batch_axes, None, head_axes, None)
        seg_spec = P(batch_axes, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * len(seg_args),
                            out_specs=qkv_spec, check_vma=False)(q, k, v, *seg_args)
    rows = mask.row_has_key(l, s) if mask is not None else None
    return _zero_rows(out.astype(q.dtype), rows)
