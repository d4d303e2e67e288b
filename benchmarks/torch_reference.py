"""The PyTorch side of the speed comparisons: what a user of the official Bifrost-1 code runs, with bifrost-jax's
weights (exported through ``bifrost_jax.port``) so that outputs can be compared.

* ``OfficialBifrostMLLM``: the dual-branch Qwen2.5-VL in the official formulation, built from transformers'
  ``Qwen2_5_VLTextModel`` with the ``vision_branch_*`` copies attached to every decoder layer under the official
  checkpoint's key names. Every step runs the full text + image sequence through BOTH weight sets (mixed by the
  image-position mask), with a dense additive mask, on [uncond; cond] rows (the unconditional half is always
  computed). ``mar_decode_official`` is the official decoding loop around it, given the orders and schedule.
* ``LatentUpsampler`` + ``load_latent_controlnet``: the Bifrost-1 latent ControlNet as diffusers'
  ``FluxControlNetModel`` with a C_clip-wide ``controlnet_x_embedder`` and the 2x upsampler in front, loaded from a
  directory written by ``port.save("latent-controlnet", ...)``.
* ``flux_controlnet_sample``: the FluxControlNetPipeline denoising loop (flow-matching Euler, ControlNet residuals
  into the transformer every step) on precomputed text embeddings; ``unpack_latents`` / ``vae_decode`` its tail.

torch is imported at module level: this file is benchmark code, run where torch is installed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLRMSNorm, Qwen2_5_VLTextModel, Qwen2MLP,
                                                                apply_rotary_pos_emb)

BRANCH = "vision_branch_"
UPSAMPLER_PREFIX = "up_sampling_block."


# ----------------------------------------------------------------------------------------------------------------
# the MLLM, official formulation

class OfficialBifrostMLLM(torch.nn.Module):
    """Official-layout module tree: ``vision_language_model.model`` (a transformers ``Qwen2_5_VLTextModel`` whose
    layers carry the generation branch), ``vision_head``, ``mask_token`` (1, 1, C), ``learnable_pos_emb`` (1, N, C).
    ``load_state_dict`` takes ``port.bifrost.official_state_dict``'s keys (without the ViT and LM head)."""

    def __init__(self, text_config: dict, num_image_tokens: int, attn_implementation: str = "sdpa"):
        super().__init__()
        cfg = Qwen2_5_VLTextConfig(**text_config)
        cfg._attn_implementation = attn_implementation
        self.config = cfg
        self.num_image_tokens = num_image_tokens
        lm = Qwen2_5_VLTextModel(cfg)
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        for layer in lm.layers:
            attn = layer.self_attn
            for name in ("q", "k", "v"):
                base = getattr(attn, f"{name}_proj")
                setattr(attn, f"{BRANCH}{name}_proj", torch.nn.Linear(hidden, base.out_features, bias=True))
            attn.vision_branch_o_proj = torch.nn.Linear(attn.o_proj.in_features, hidden, bias=False)
            layer.vision_branch_mlp = Qwen2MLP(cfg)
            layer.vision_branch_input_layernorm = Qwen2_5_VLRMSNorm(hidden, eps=eps)
            layer.vision_branch_post_attention_layernorm = Qwen2_5_VLRMSNorm(hidden, eps=eps)
        lm.vision_branch_norm = Qwen2_5_VLRMSNorm(hidden, eps=eps)
        self.vision_language_model = torch.nn.Module()
        self.vision_language_model.model = lm
        self.vision_head = torch.nn.Linear(hidden, hidden, bias=True)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, hidden))
        self.learnable_pos_emb = torch.nn.Parameter(torch.zeros(1, num_image_tokens, hidden))

    @property
    def lm(self) -> Qwen2_5_VLTextModel:
        return self.vision_language_model.model

    def load_numpy_state(self, state: dict) -> None:
        """Load a numpy state dict; every key of the module must be given and nothing else (strict)."""
        self.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)

    def _attention_bias(self, attention_mask, dtype):
        """Dense additive (B, 1, L, L): causal + key padding at finfo.min, the image x image block open."""
        n = self.num_image_tokens
        b = attention_mask.shape[0]
        keys = torch.cat([attention_mask.bool(), torch.ones(b, n, dtype=torch.bool)], dim=1)
        length = keys.shape[1]
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & keys[:, None, None, :]
        allowed[:, :, -n:, -n:] = True
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _positions(self, attention_mask):
        """(3, B, T + N): real text tokens 0, 1, ... over non-pad tokens, pads 1, image slots 0."""
        m = attention_mask.long()
        text = torch.where(m > 0, torch.cumsum(m, dim=-1) - 1, torch.ones_like(m))
        pos = torch.cat([text, torch.zeros(m.shape[0], self.num_image_tokens, dtype=torch.long)], dim=1)
        return pos[None].expand(3, -1, -1)

    def _layer(self, layer, x, sel, cos, sin, bias):
        """One decoder layer with both weight sets on every token, mixed by ``sel`` (B, L, 1): 1 = image slot."""
        mix = lambda orig, branch: sel * branch + (1 - sel) * orig  # noqa: E731
        b, length, _ = x.shape
        attn = layer.self_attn
        hd = attn.head_dim
        h = mix(layer.input_layernorm(x), layer.vision_branch_input_layernorm(x))
        heads = lambda t: t.view(b, length, -1, hd).transpose(1, 2)  # noqa: E731
        q = heads(mix(attn.q_proj(h), attn.vision_branch_q_proj(h)))
        k = heads(mix(attn.k_proj(h), attn.vision_branch_k_proj(h)))
        v = heads(mix(attn.v_proj(h), attn.vision_branch_v_proj(h)))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o, _ = sdpa_attention_forward(attn, q, k, v, bias, dropout=0.0, scaling=attn.scaling, is_causal=False)
        o = o.reshape(b, length, -1)
        x = x + mix(attn.o_proj(o), attn.vision_branch_o_proj(o))
        h = mix(layer.post_attention_layernorm(x), layer.vision_branch_post_attention_layernorm(x))
        return x + mix(layer.mlp(h), layer.vision_branch_mlp(h))

    def forward(self, input_ids, attention_mask, tokens, masked):
        """pred (B, N, C) for the text prefixes (B, T) and image slots ``tokens`` (B, N, C), ``masked`` (B, N)."""
        lm, n = self.lm, self.num_image_tokens
        z = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens) + self.learnable_pos_emb
        x = torch.cat([lm.embed_tokens(input_ids), z], dim=1)
        b, length = x.shape[:2]
        sel = torch.cat([torch.zeros(b, length - n), torch.ones(b, n)], dim=1)[..., None].to(x.dtype)
        cos, sin = lm.rotary_emb(x, self._positions(attention_mask))
        bias = self._attention_bias(attention_mask, x.dtype)
        for layer in lm.layers:
            x = self._layer(layer, x, sel, cos, sin, bias)
        x = sel * lm.vision_branch_norm(x) + (1 - sel) * lm.norm(x)
        return self.vision_head(x[:, -n:])


@torch.no_grad()
def mar_decode_official(model: OfficialBifrostMLLM, input_ids, attention_mask, ranks, remaining, *,
                        cfg_weight: float = 1.0, uncond_input_ids=None, uncond_attention_mask=None):
    """The official loop: every step the whole [uncond; cond] batch through ``model``; CFG on the full halves; the
    slots that leave the mask (``ranks`` in [remaining[s+1], remaining[s])) take the guided prediction. ``ranks``
    (B, N) and ``remaining`` (steps + 1,) come from ``sample.mar`` (same orders, same schedule). Without
    ``uncond_input_ids`` the conditional prefixes stand in for the unconditional half (still computed)."""
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    am = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    uids = ids if uncond_input_ids is None else torch.tensor(np.asarray(uncond_input_ids), dtype=torch.long)
    uam = am if uncond_attention_mask is None else torch.tensor(np.asarray(uncond_attention_mask),
                                                                   dtype=torch.long)
    both_ids, both_am = torch.cat([uids, ids]), torch.cat([uam, am])
    ranks = torch.tensor(np.asarray(ranks), dtype=torch.long)
    remaining = [int(r) for r in np.asarray(remaining)]
    b, n = ranks.shape
    dtype = model.mask_token.dtype
    tokens = model.mask_token.reshape(1, 1, -1).expand(b, n, -1).clone()
    for s in range(len(remaining) - 1):
        masked = ranks < remaining[s]
        reveal = masked & (ranks >= remaining[s + 1])
        pred = model(both_ids, both_am, torch.cat([tokens, tokens]), torch.cat([masked, masked])).to(dtype)
        uncond, cond = pred.chunk(2)
        tokens = torch.where(reveal[..., None], uncond + cfg_weight * (cond - uncond), tokens)
    return tokens


# ----------------------------------------------------------------------------------------------------------------
# the latent ControlNet

class LatentUpsampler(torch.nn.Module):
    """Bifrost-1's 2x upsampler of the (h*w, C) CLIP latents: ConvTranspose 2x2/2 + BN + ReLU, 3x3 conv + BN, plus
    the nearest-neighbour upsampled input, ReLU; ``up_sampling_block.*`` keys."""

    def __init__(self, channels: int, grid):
        super().__init__()
        self.grid = tuple(grid)
        self.upconv = torch.nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv = torch.nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        b, _, c = x.shape
        h, w = self.grid
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        skip = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        y = torch.relu(self.bn1(self.upconv(x)))
        y = torch.relu(self.bn2(self.conv(y)) + skip)
        return y.permute(0, 2, 3, 1).reshape(b, 4 * h * w, c)


def load_latent_controlnet(path: str, dtype=torch.float32):
    """(diffusers FluxControlNetModel with a C_clip-wide controlnet_x_embedder, LatentUpsampler), eval mode, from a
    ``port.save("latent-controlnet", ...)`` directory; strict on every key."""
    from diffusers import FluxControlNetModel

    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    c_clip, grid = int(config.pop("clip_latent_dim")), config.pop("clip_grid")
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    controlnet = FluxControlNetModel(**init)
    controlnet.controlnet_x_embedder = torch.nn.Linear(c_clip, controlnet.inner_dim)
    upsampler = LatentUpsampler(c_clip, grid)
    state = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    upsampler.load_state_dict({k[len(UPSAMPLER_PREFIX):]: v for k, v in state.items()
                               if k.startswith(UPSAMPLER_PREFIX)}, strict=True)
    controlnet.load_state_dict({k: v for k, v in state.items() if not k.startswith(UPSAMPLER_PREFIX)}, strict=True)
    return controlnet.to(dtype).eval(), upsampler.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# denoising and decoding

@torch.no_grad()
def flux_controlnet_sample(transformer, controlnet, upsampler, clip_latents, prompt_embeds, pooled, noise, sigmas,
                           img_ids, txt_ids, *, guidance: float, conditioning_scale: float):
    """FluxControlNetPipeline's loop: each step the ControlNet (on the upsampled CLIP latents, its
    ``controlnet_x_embedder`` applied inside) gives residuals that the transformer adds; Euler update in float32."""
    x = noise
    b = x.shape[0]
    cond = upsampler(clip_latents.to(x.dtype))
    g = torch.full((b,), guidance, dtype=torch.float32)
    sigmas = [float(s) for s in np.asarray(sigmas)]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((b,), sigma, dtype=x.dtype)
        blocks, singles = controlnet(hidden_states=x, controlnet_cond=cond, conditioning_scale=conditioning_scale,
                                     encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=t,
                                     img_ids=img_ids, txt_ids=txt_ids,
                                     guidance=g.to(x.dtype) if controlnet.config.guidance_embeds else None,
                                     return_dict=False)
        v = transformer(hidden_states=x, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids,
                        guidance=g.to(x.dtype) if transformer.config.guidance_embeds else None,
                        controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                        return_dict=False)[0]
        x = (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)
    return x


def unpack_latents(tokens, height: int, width: int):
    """(B, h/2 * w/2, 4C) packed tokens -> (B, C, h, w) latents (diffusers' ``_unpack_latents``, latent sizes)."""
    b, _, d = tokens.shape
    c = d // 4
    z = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, height, width)


@torch.no_grad()
def vae_decode(vae, packed, height: int, width: int):
    """uint8 (B, H, W, 3) images from packed latents, as FluxPipeline: unscale + shift, decode, [-1, 1] -> uint8."""
    z = unpack_latents(packed.float(), height, width)
    z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
    image = torch.clamp(image / 2 + 0.5, 0, 1)
    return torch.round(image * 255).to(torch.uint8).permute(0, 2, 3, 1)

