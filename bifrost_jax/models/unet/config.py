"""The diffusers ``UNet2DConditionModel`` config (Stable Diffusion 1.x, 2.x and SDXL) with the per-block values the
modules need.

A config.json is read field by field: every field diffusers defines is accepted, but a value that selects a feature
this port does not implement (class embeddings, encoder projections, dual cross-attention, ...) raises naming the
field and the value, rather than building a model that silently differs. Unknown fields raise too.

Naming trap kept from diffusers: ``attention_head_dim`` is the number of attention HEADS per block (the width of a
head is the block's channels divided by it) and ``num_attention_heads`` must stay null.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from bifrost_jax.nn.layers import activation

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

# config.json keys that describe the file rather than the model
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _per_block(value, n: int, field: str) -> tuple:
    """An int (or bool) broadcast to ``n`` blocks, or a sequence of exactly ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {field}={list(value)} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def check_unsupported(cfg: Any, unsupported: dict, what: str) -> None:
    """Raise if a field of ``cfg`` differs from the value this port implements (``unsupported``: field -> the
    accepted values)."""
    for field, allowed in unsupported.items():
        value = getattr(cfg, field)
        if value not in allowed:
            raise ValueError(f"{what} config: {field}={value!r} is not supported (this port implements "
                             f"{' or '.join(repr(a) for a in allowed)})")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """Every ``UNet2DConditionModel.__init__`` argument, defaults as diffusers'. See ``SD15``, ``SD21``, ``SDXL``."""
    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    mid_block_type: Optional[str] = CROSS_MID
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    only_cross_attention: Any = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: Any = False  # softmax is always float32 here: no effect on the result
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Optional[int] = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Any = None
    cross_attention_norm: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        for f in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                  "only_cross_attention"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {len(self.down_block_types)} down_block_types, "
                             f"{len(self.up_block_types)} up_block_types and {n} block_out_channels must agree")
        bad = sorted(set(self.down_block_types) - {CROSS_DOWN, PLAIN_DOWN})
        bad += sorted(set(self.up_block_types) - {CROSS_UP, PLAIN_UP})
        if bad:
            raise ValueError(f"UNet config: block type(s) {bad} not supported (this port implements {CROSS_DOWN}, "
                             f"{PLAIN_DOWN}, {CROSS_UP}, {PLAIN_UP})")
        check_unsupported(self, {
            "mid_block_type": (CROSS_MID,), "only_cross_attention": (False,), "dual_cross_attention": (False,),
            "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
            "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None, "text_time"),
            "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
            "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
            "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
            "attention_type": ("default",), "class_embeddings_concat": (False,),
            "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
            "reverse_transformer_layers_per_block": (None,),
        }, "UNet")
        if not self.norm_num_groups:
            raise ValueError(f"UNet config: norm_num_groups={self.norm_num_groups!r} is not supported (a number of "
                             "groups is needed)")
        if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None
                                                        or self.projection_class_embeddings_input_dim is None):
            raise ValueError("UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        for f in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
            values = _per_block(getattr(self, f), n, f)
            if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise ValueError(f"UNet config: {f}={getattr(self, f)!r} must be an int or one int per block "
                                 "(nested per-layer lists are not supported)")
        if len(set(self.cross_dims)) != 1:
            raise ValueError(f"UNet config: cross_attention_dim={list(self.cross_dims)} differs between blocks; one "
                             "text width is supported (every block reads the same encoder_hidden_states)")
        for i, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups:
                raise ValueError(f"UNet config: block_out_channels[{i}]={c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
            if self.down_block_types[i] == CROSS_DOWN and c % self.heads[i]:
                raise ValueError(f"UNet config: block {i} has {c} channels, not divisible into {self.heads[i]} "
                                 "heads (attention_head_dim)")
        activation(self.act_fn)

    # ------------------------------------------------------------------------------------------------------------
    # per-block values (down-block order; the up blocks use them reversed)
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (diffusers' ``attention_head_dim``, see the module docstring)."""
        return _per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def num_upsamplers(self) -> int:
        return self.num_blocks - 1

    @property
    def num_time_ids(self) -> int:
        """SDXL micro-conditioning values per example (6: original size, crop top-left, target size)."""
        if self.addition_embed_type != "text_time":
            return 0
        return 6

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text embedding ``text_embeds`` that "text_time" expects."""
        return self.projection_class_embeddings_input_dim - self.num_time_ids * self.addition_time_embed_dim

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, what: str = "UNet2DConditionModel") -> "UNet2DConditionConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in _META_KEYS)
        if unknown:
            raise ValueError(f"{what} config: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def to_hf_config(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return {"_class_name": "UNet2DConditionModel", **out}


# Stable Diffusion v1.5, v2.1 (768-v) and SDXL base 1.0, as in their unet/config.json
SD15 = UNet2DConditionConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21 = UNet2DConditionConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                             use_linear_projection=True, upcast_attention=True)
SDXL = UNet2DConditionConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                             down_block_types=(PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN),
                             up_block_types=(CROSS_UP, CROSS_UP, PLAIN_UP), cross_attention_dim=2048,
                             attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                             use_linear_projection=True, addition_embed_type="text_time",
                             addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
