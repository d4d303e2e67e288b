"""FLUX ControlNets: the stock diffusers ``FluxControlNetModel`` and Bifrost-1's latent ControlNet (docs/design.md §7).

Both run copies of the first FLUX blocks on ``x_embedder(noisy latents) + embed_condition(condition)`` and return,
for every block, its image-token output through a zero-initialised Linear times ``conditioning_scale``: the
residuals that ``FluxTransformer2DModel`` adds (``controlnet_block_samples``, ``controlnet_single_block_samples``).
Residuals are returned stacked, (N, B, S_img, D) each (None when a kind has no blocks); the transformer also
accepts lists.

- ``FluxControlNetModel``: the condition is the packed VAE latent of the control image, (B, S_img, in_channels),
  through a zero-init Linear ``controlnet_x_embedder``. ``num_mode`` (ControlNet-Union) is supported; the
  ``conditioning_embedding_channels`` pixel hint block is not.
- ``LatentControlNet``: the condition is Bifrost-1's patch-level CLIP latents (B, h*w, C_clip) -> ``LatentUpsampler``
  (2x, BatchNorm) -> zero-init Linear(C_clip -> D). ``embed_condition`` computes that once per image (docs/design.md §7.5); pass
  its result as ``controlnet_cond_embedding`` at every denoising step. Training updates the BatchNorm statistics:
  ``apply(..., train=True, mutable=["batch_stats"])``.

``controlnet_from_transformer`` builds either from a FLUX transformer like diffusers ``from_transformer``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bifrost_jax.models.flux.transformer import (FluxConfig, _batched_ids, _check_hf_keys, _constrain, flux_blocks,
                                                 flux_embed, rope_table, x_embedder)
from bifrost_jax.models.flux.upsampler import LatentUpsampler
from bifrost_jax.nn.layers import Dense, Embed

Dtype = Any

# diffusers FluxControlNetModel.__init__ arguments
_HF_FIELDS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
              "axes_dims_rope", "num_mode", "conditioning_embedding_channels")
# our additions for the Bifrost-1 latent ControlNet (the official config.json has neither: its width is hard-coded
# 3584 and its grid taken as sqrt(tokens)); written on export, optional on load
_LATENT_FIELDS = ("clip_latent_dim", "clip_grid")


@dataclasses.dataclass(frozen=True)
class FluxControlNetConfig:
    """diffusers ``FluxControlNetModel`` config.json fields, plus ``clip_latent_dim`` / ``clip_grid`` (h, w) for the
    latent ControlNet (both None for the stock one)."""
    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    num_mode: Optional[int] = None
    conditioning_embedding_channels: Optional[int] = None
    clip_latent_dim: Optional[int] = None
    clip_grid: Optional[tuple[int, int]] = None

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.clip_grid is not None:
            grid = tuple(int(g) for g in self.clip_grid)
            if len(grid) != 2:
                raise ValueError(f"FluxControlNet config: clip_grid must be (h, w), got {self.clip_grid}")
            object.__setattr__(self, "clip_grid", grid)
        if self.conditioning_embedding_channels is not None:
            raise ValueError("FluxControlNet config: conditioning_embedding_channels="
                             f"{self.conditioning_embedding_channels} (the pixel-space input_hint_block) is not "
                             "supported; use a ControlNet fed with packed VAE latents (the field null)")
        if (self.clip_latent_dim is None) != (self.clip_grid is None):
            raise ValueError("FluxControlNet config: clip_latent_dim and clip_grid must both be set (latent "
                             f"ControlNet) or both be null (stock); got {self.clip_latent_dim}, {self.clip_grid}")
        self.flux  # validates the transformer fields  # noqa: B018

    @property
    def is_latent(self) -> bool:
        return self.clip_latent_dim is not None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def flux(self) -> FluxConfig:
        """The transformer fields (the blocks and embedders are FLUX's)."""
        return FluxConfig(patch_size=self.patch_size, in_channels=self.in_channels, num_layers=self.num_layers,
                          num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                          num_attention_heads=self.num_attention_heads, joint_attention_dim=self.joint_attention_dim,
                          pooled_projection_dim=self.pooled_projection_dim, guidance_embeds=self.guidance_embeds,
                          axes_dims_rope=self.axes_dims_rope)

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides) -> "FluxControlNetConfig":
        fields = _check_hf_keys(cfg, _HF_FIELDS + _LATENT_FIELDS, "FluxControlNetModel")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_hf_config(self) -> dict:
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        if self.is_latent:
            out["clip_latent_dim"] = self.clip_latent_dim
            out["clip_grid"] = list(self.clip_grid)
        return {"_class_name": "FluxControlNetModel", **out}


class FluxControlNetModel(nn.Module):
    """diffusers ``FluxControlNetModel``. ``__call__`` returns (block_samples (N, B, S_img, D) or None,
    single_block_samples (M, B, S_img, D) or None), already multiplied by ``conditioning_scale``."""
    config: FluxControlNetConfig
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    def setup(self):
        if self.config.is_latent:
            raise ValueError("FluxControlNetModel: config has clip_latent_dim/clip_grid; use LatentControlNet")
        self.controlnet_x_embedder = self._zero_dense("controlnet_x_embedder")

    def _zero_dense(self, name):
        # zero_module(...) upstream: the ControlNet starts as an exact no-op on FLUX
        return Dense(self.config.inner_dim, kernel_axes=("cond", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros, name=name)

    def embed_condition(self, controlnet_cond, train: bool = False):
        """(B, S_img, in_channels) packed control latents -> (B, S_img, D), added to ``x_embedder``'s output."""
        del train  # no batch statistics here
        return self.controlnet_x_embedder(controlnet_cond)

    @nn.compact
    def __call__(self, hidden_states, controlnet_cond=None, controlnet_mode=None, conditioning_scale=1.0,
                 encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None, txt_ids=None,
                 guidance=None, *, controlnet_cond_embedding=None, train: bool = False):
        cfg = self.config
        flux = cfg.flux
        x = x_embedder(self, flux)(hidden_states)
        if controlnet_cond_embedding is None:
            if controlnet_cond is None:
                raise ValueError("ControlNet: pass controlnet_cond or a precomputed controlnet_cond_embedding")
            controlnet_cond_embedding = self.embed_condition(controlnet_cond, train=train)
        x = _constrain(x + controlnet_cond_embedding.astype(x.dtype))
        b = x.shape[0]
        txt, temb = flux_embed(self, flux, encoder_hidden_states, pooled_projections, timestep, guidance, b)
        txt_ids = _batched_ids(txt_ids, b)
        if cfg.num_mode is not None:
            # ControlNet-Union: a learned mode token is prepended to the text (its position id repeats txt_ids[0])
            if controlnet_mode is None:
                raise ValueError("ControlNet-Union (num_mode set): pass controlnet_mode, (B, 1) integer ids")
            mode = Embed(cfg.num_mode, cfg.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="controlnet_mode_embedder")(jnp.asarray(controlnet_mode, jnp.int32).reshape(b, -1))
            txt = jnp.concatenate([mode.astype(txt.dtype), txt], axis=1)
            txt_ids = jnp.concatenate([txt_ids[:, :1], txt_ids], axis=1)
        rope = rope_table(txt_ids, img_ids, flux.axes_dims_rope, b)
        _, _, double_out, single_out = flux_blocks(self, flux, x, txt, temb, rope, collect=True)

        def project(outputs, name, n):
            if n == 0:
                return None
            samples = [self._zero_dense(f"{name}_{i}")(outputs[i]) for i in range(n)]
            return jnp.stack(samples) * jnp.asarray(conditioning_scale, samples[0].dtype)

        return (project(double_out, "controlnet_blocks", cfg.num_layers),
                project(single_out, "controlnet_single_blocks", cfg.num_single_layers))

    def dummy_inputs(self, batch: int = 1, txt_len: int = 2):
        """Small inputs with the right trailing shapes (for ``init`` / ``eval_shape``)."""
        cfg = self.config
        img_len = 4 * cfg.clip_grid[0] * cfg.clip_grid[1] if cfg.is_latent else 4
        n_axes = len(cfg.axes_dims_rope)
        cond = (jnp.zeros((batch, cfg.clip_grid[0] * cfg.clip_grid[1], cfg.clip_latent_dim), jnp.float32)
                if cfg.is_latent else jnp.zeros((batch, img_len, cfg.in_channels), jnp.float32))
        return dict(hidden_states=jnp.zeros((batch, img_len, cfg.in_channels), jnp.float32),
                    controlnet_cond=cond,
                    controlnet_mode=jnp.zeros((batch, 1), jnp.int32) if cfg.num_mode is not None else None,
                    encoder_hidden_states=jnp.zeros((batch, txt_len, cfg.joint_attention_dim), jnp.float32),
                    pooled_projections=jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32),
                    timestep=jnp.zeros((batch,), jnp.float32),
                    img_ids=jnp.zeros((img_len, n_axes), jnp.float32),
                    txt_ids=jnp.zeros((txt_len, n_axes), jnp.float32),
                    guidance=jnp.zeros((batch,), jnp.float32) if cfg.guidance_embeds else None)


class LatentControlNet(FluxControlNetModel):
    """Bifrost-1's latent ControlNet (docs/design.md §7.1): ``controlnet_cond`` is (B, h*w, C_clip) patch-level CLIP latents,
    ``(h, w) = config.clip_grid``; the image tokens must be the (2h, 2w) FLUX packed grid, row-major."""

    def setup(self):
        cfg = self.config
        if not cfg.is_latent:
            raise ValueError("LatentControlNet: config needs clip_latent_dim and clip_grid")
        self.up_sampling_block = LatentUpsampler(cfg.clip_latent_dim, cfg.clip_grid, dtype=self.dtype,
                                                 param_dtype=self.param_dtype)
        self.controlnet_x_embedder = self._zero_dense("controlnet_x_embedder")

    def embed_condition(self, controlnet_cond, train: bool = False):
        """(B, h*w, C_clip) -> (B, 4*h*w, D): upsample 2x, then the zero-init Linear. Independent of the timestep:
        compute it once per image (docs/design.md §7.5). ``train`` uses batch statistics (and needs mutable batch_stats)."""
        return self.controlnet_x_embedder(self.up_sampling_block(controlnet_cond, train=train))


def controlnet_module(config: FluxControlNetConfig, **kw) -> FluxControlNetModel:
    """The right class for ``config`` (latent if it has clip_latent_dim/clip_grid)."""
    return (LatentControlNet if config.is_latent else FluxControlNetModel)(config, **kw)


# ----------------------------------------------------------------------------------------------------------------
# from_transformer

def _block_params(tree: dict, name: str, i: int, scanned: bool):
    if scanned:
        return jax.tree.map(lambda a: a[i], tree[name]["block"])
    return tree[f"{name}_{i}"]


def copy_transformer_into_controlnet(cn_params, flux_params, cn_module, flux_module, only_copied: bool = False):
    """diffusers ``FluxControlNetModel.from_transformer`` on parameter trees: ``cn_params`` with ``time_text_embed``,
    ``context_embedder``, ``x_embedder`` and the first double / single blocks replaced by FLUX's (either layer
    layout on either side). The zero-init heads and the upsampler are left alone (``only_copied``: return just
    the copied entries, e.g. to copy from a FLUX loaded after the ControlNet was initialised). Values keep FLUX's
    dtypes: callers cast to the ControlNet's own (a trained copy keeps fp32 master weights under a bf16 FLUX)."""
    cn_cfg, f_cfg = cn_module.config, flux_module.config
    out = {} if only_copied else dict(cn_params)
    for name in ("time_text_embed", "context_embedder", "x_embedder"):
        out[name] = flux_params[name]
    for name, n_cn, n_f in (("transformer_blocks", cn_cfg.num_layers, f_cfg.num_layers),
                            ("single_transformer_blocks", cn_cfg.num_single_layers, f_cfg.num_single_layers)):
        k = min(n_cn, n_f)
        if k == 0:
            continue
        blocks = [_block_params(flux_params, name, i, flux_module.scan_layers) for i in range(k)]
        if not cn_module.scan_layers:
            out.update({f"{name}_{i}": blocks[i] for i in range(k)})
            continue
        if k < n_cn and only_copied:
            raise ValueError(f"controlnet has {n_cn} {name} but FLUX only {n_f}: scanned ControlNet blocks cannot be "
                             "partly copied after loading; use num_layers <= FLUX's")
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        if k < n_cn:
            stacked = jax.tree.map(lambda a, b: a.at[:k].set(b.astype(a.dtype)), cn_params[name]["block"], stacked)
        out[name] = {"block": stacked}
    return out


@dataclasses.dataclass(frozen=True)
class _ScanLayout:
    """What :func:`copy_transformer_into_controlnet` reads of a transformer module: its config and layer layout."""
    config: FluxConfig
    scan_layers: bool


def controlnet_from_transformer(transformer_variables, transformer_config: FluxConfig, num_layers: int = 4,
                                num_single_layers: int = 10, attention_head_dim: Optional[int] = None,
                                num_attention_heads: Optional[int] = None, *, transformer_scanned: bool = False,
                                clip_latent_dim: Optional[int] = None, clip_grid: Optional[tuple[int, int]] = None,
                                load_weights_from_transformer: bool = True, rng=None, **module_kw):
    """(module, variables) of a ControlNet built like diffusers ``FluxControlNetModel.from_transformer``.

    Copies ``time_text_embed``, ``context_embedder``, ``x_embedder`` and the FIRST ``num_layers`` double /
    ``num_single_layers`` single blocks (blocks beyond the transformer's keep their fresh init, as with
    ``load_state_dict(strict=False)``); ``controlnet_blocks*`` and ``controlnet_x_embedder`` are zero, so the residuals
    start exactly at 0. ``attention_head_dim``/``num_attention_heads`` default to the transformer's (diffusers
    defaults them to FLUX.1's 128/24; they must match the transformer to copy weights). With ``clip_latent_dim`` and
    ``clip_grid`` the result is a ``LatentControlNet`` (upsampler freshly initialised). ``module_kw``: dtype,
    param_dtype, scan_layers, remat_policy, attention_impl of the new module.
    """
    t = transformer_config
    head_dim = t.attention_head_dim if attention_head_dim is None else attention_head_dim
    heads = t.num_attention_heads if num_attention_heads is None else num_attention_heads
    if load_weights_from_transformer and (head_dim, heads) != (t.attention_head_dim, t.num_attention_heads):
        raise ValueError(f"controlnet_from_transformer: {heads} heads x {head_dim} differ from the transformer's "
                         f"{t.num_attention_heads} x {t.attention_head_dim}; weights cannot be copied")
    config = FluxControlNetConfig(patch_size=t.patch_size, in_channels=t.in_channels, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=head_dim,
                                  num_attention_heads=heads, joint_attention_dim=t.joint_attention_dim,
                                  pooled_projection_dim=t.pooled_projection_dim, guidance_embeds=t.guidance_embeds,
                                  axes_dims_rope=t.axes_dims_rope, clip_latent_dim=clip_latent_dim,
                                  clip_grid=clip_grid)
    module = controlnet_module(config, **module_kw)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    copy_all_blocks = num_layers <= t.num_layers and num_single_layers <= t.num_single_layers
    if not (load_weights_from_transformer and copy_all_blocks):
        # some blocks keep a fresh init (as diffusers leaves them): initialise the whole model
        variables = nn.meta.unbox(jax.jit(lambda r: module.init(r, **module.dummy_inputs()))(rng))
        if not load_weights_from_transformer:
            return module, variables
    else:
        # everything but the zero heads, the upsampler and the mode table is copied: build the tree from shapes
        # (no compile of the whole model), initialising only those parts
        shapes = nn.meta.unbox(jax.eval_shape(lambda r: module.init(r, **module.dummy_inputs()), rng))
        variables = {"params": {}}
        for name, leaf in shapes["params"].items():
            if name.startswith(("controlnet_blocks_", "controlnet_single_blocks_", "controlnet_x_embedder")):
                variables["params"][name] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), leaf)
        up_key, mode_key = jax.random.split(rng)
        if config.is_latent:
            up = LatentUpsampler(config.clip_latent_dim, config.clip_grid, dtype=module.dtype,
                                 param_dtype=module.param_dtype)
            x = jnp.zeros((1, config.clip_grid[0] * config.clip_grid[1], config.clip_latent_dim), jnp.float32)
            up_vars = nn.meta.unbox(jax.jit(up.init)(up_key, x))
            variables["params"]["up_sampling_block"] = up_vars["params"]
            variables["batch_stats"] = {"up_sampling_block": up_vars["batch_stats"]}
        if config.num_mode is not None:
            table = Embed(config.num_mode, config.inner_dim, param_dtype=module.param_dtype)
            variables["params"]["controlnet_mode_embedder"] = nn.meta.unbox(
                table.init(mode_key, jnp.zeros((1, 1), jnp.int32)))["params"]
        blocks = {k: v for k, v in shapes["params"].items() if "transformer_blocks" in k}
        variables["params"].update(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), blocks))
    copied = copy_transformer_into_controlnet(variables["params"], transformer_variables["params"], module,
                                              _ScanLayout(t, transformer_scanned))
    params = jax.tree.map(lambda v: jnp.asarray(v, module.param_dtype), copied)
    variables = {**variables, "params": params}
    if copy_all_blocks:  # the tree built by hand has exactly the module's variables
        want = jax.tree.map(lambda s: (s.shape, jnp.dtype(s.dtype)), shapes)
        got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), variables)
        if want != got:
            raise AssertionError("controlnet_from_transformer: variables do not match the module's structure")
    return module, variables
