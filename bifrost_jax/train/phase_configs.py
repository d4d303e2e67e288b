"""Config sections of the Bifrost phases (``configs/{controlnet,mllm,flux,vae}.py`` and ``configs/full/*``).

Each model section holds the module's config (``config``: the diffusers/transformers config.json fields), the
compute and parameter dtypes, layer scanning / remat, and where its weights come from: ``port_dir`` (a
diffusers/transformers directory or a ``bifrost port`` Orbax directory) and ``init_from`` / ``init_step`` (another
phase's checkpoint, e.g. ``WORKDIR/flux/checkpoints``). The module is always built from ``config``; a port or
checkpoint must match it (a mismatch is an error naming the weights).

TINY sizes run a step in a fraction of a second on CPU (tests, demo). They are chained: ViT view 112 px -> 4x4
CLIP latents -> (upsampled) 8x8 FLUX tokens -> 16x16 latents -> 32 px VAE view (VAE downsampling 2).
FULL sizes are Qwen2.5-VL-7B + FLUX.1-dev (docs/design.md §1-§2): 448 px ViT view, 256 latents, 512 px images.
"""
from __future__ import annotations

import ml_collections

from bifrost_jax.configs import base_config

def section(config: dict, *, dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none",
            port_dir="", init_from="", **extra) -> ml_collections.ConfigDict:
    """A component section (``bifrost_jax/components``): the same shape in training and generation configs."""
    s = ml_collections.ConfigDict()
    s.config = ml_collections.ConfigDict(config)
    s.dtype, s.param_dtype = dtype, param_dtype
    s.scan_layers, s.remat_policy = scan_layers, remat_policy
    s.port_dir, s.init_from, s.init_step = port_dir, init_from, -1
    # dotted paths of init_from's weights this component may leave unused (e.g. "params.transformer.double_0");
    # any other unused one is an error
    s.init_allow_unused = ()
    for k, v in extra.items():
        s[k] = v
    return s


# ----------------------------------------------------------------------------------------------------------------
# tiny

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, sample_size=32, scaling_factor=1.0, shift_factor=0.0)
TINY_T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
# pad = eos = <|endoftext|> (id 0 of the word tokenizer): the pooled token is the first pad after the caption
TINY_CLIP = dict(model_type="clip_text_model", vocab_size=128, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 eos_token_id=0, bos_token_id=0, pad_token_id=0, projection_dim=32)
TINY_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,))
TINY_MLLM_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, rope_theta=1e6, mrope_section=(2, 1, 1))


def tiny_data(**overrides) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(
        source="shapes", data_dir="data/shapes_tiny", image_resolution=64, train_size=256, shapes_seed=0,
        shapes_layout="random", shapes_jitter=0.0,
        captions_source="", class_names_file="", vae_resolution=32, random_crop=False, min_crop_scale=1.0,
        text_dropout=0.0, precomputed_clip_latents="", worker_count=0, num_threads=2, prefetch_buffer_size=4))
    d.update(overrides)
    return d


def tiny_base(phase: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.phase = phase
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    c.train.update(steps=200, batch_size=8, log_every=10)
    c.optim.update(lr=1e-3, warmup_steps=10)
    c.checkpoint.update(every=100, keep=2)
    c.data = tiny_data()
    return c


def flow_model(**overrides) -> ml_collections.ConfigDict:
    """``model`` of the flux-family phases: FLUX guidance value, sigma sampling, posterior sample or mean."""
    m = ml_collections.ConfigDict(dict(guidance=3.5, weighting="logit_normal", logit_mean=0.0, logit_std=1.0,
                                       latent_sample=True, conditioning_scale=1.0))
    m.update(overrides)
    return m


def add_flux_family(c, *, flux, vae, t5, clip, t5_max_length, clip_max_length, flux_kw=None, text_kw=None,
                    vae_kw=None):
    c.model = flow_model()
    c.flux = section(flux, **(flux_kw or {}))
    c.vae = section(vae, **(vae_kw or {}))
    c.t5 = section(t5, tokenizer_dir="", max_length=t5_max_length, **(text_kw or {}))
    c.clip = section(clip, tokenizer_dir="", max_length=clip_max_length, **(text_kw or {}))
    return c


def tiny_flux_family(phase: str):
    c = tiny_base(phase)
    return add_flux_family(c, flux=TINY_FLUX, vae=TINY_VAE, t5=TINY_T5, clip=TINY_CLIP, t5_max_length=16,
                           clip_max_length=16)


def tiny_vision_section():
    return section(TINY_VISION, resolution=112)


def tiny_language_section():
    """The understanding phase's language model: the tiny MLLM's, embeddings tied (as Qwen2.5-VL-3B), so that the
    mllm phase's copy of it is the whole text path."""
    return section(dict(TINY_MLLM_TEXT, tie_word_embeddings=True), tokenizer_dir="", max_length=64,
                   questions_per_image=1)


def tiny_mllm_section():
    return section(dict(text=TINY_MLLM_TEXT, num_image_tokens=16, image_grid=(4, 4), mask_ratio_min=0.7,
                         mask_ratio_max=1.0, mask_ratio_mean=1.0, mask_ratio_std=0.25),
                    tokenizer_dir="", max_prompt_length=48,
                    # another phase's checkpoint (the understanding phase's) holding the frozen language model
                    # ("params.language_model"); the branch starts as its copy
                    base_init_from="")


# ----------------------------------------------------------------------------------------------------------------
# tiny UNet family (docs/unet.md): SD1.5-shaped (one CLIP text encoder) on the same 16x16 latents as FLUX's VAE view

TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                 norm_num_groups=8)
# Stable Diffusion's training schedule (scheduler_config.json fields); prediction_type "v_prediction" for SD 2.x-v
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon")


def add_unet_family(c, *, unet, vae, clip, clip_max_length, clip_2=None, unet_kw=None, text_kw=None, vae_kw=None):
    """The sections of the UNet-family phases: ``unet``, ``vae`` (the SD VAE), ``clip`` and, for SDXL
    (``addition_embed_type="text_time"``), ``clip_2`` (``CLIPTextModelWithProjection``); ``scheduler`` (the noise
    schedule and prediction type); ``model`` (posterior sample or mean, ControlNet scale in training)."""
    c.model = ml_collections.ConfigDict(dict(latent_sample=True, conditioning_scale=1.0))
    c.scheduler = ml_collections.ConfigDict(SD_SCHEDULE)
    c.unet = section(unet, **(unet_kw or {}))
    c.vae = section(vae, **(vae_kw or {}))
    c.clip = section(clip, tokenizer_dir="", max_length=clip_max_length, **(text_kw or {}))
    if clip_2 is not None:
        c.clip_2 = section(clip_2, tokenizer_dir="", max_length=clip_max_length, **(text_kw or {}))
    return c


def tiny_unet_family(phase: str):
    return add_unet_family(tiny_base(phase), unet=TINY_UNET, vae=TINY_VAE, clip=TINY_CLIP, clip_max_length=16)


def unet_controlnet_section(**overrides) -> ml_collections.ConfigDict:
    """``controlnet`` of the UNet decoder: the latent ControlNet's widths (empty: 256 halving per stage) and its
    start (``from_unet``: a copy of the UNet's encoder, diffusers ``from_unet``); the rest follows the UNet."""
    s = section({}, from_unet=True, conditioning_embedding_out_channels=())
    del s["config"]
    s.update(overrides)
    return s


# ----------------------------------------------------------------------------------------------------------------
# full size (Qwen2.5-VL-7B + FLUX.1-dev)

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu")
CLIP_L = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=768)
QWEN_VL_7B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                         patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                         fullatt_block_indexes=(7, 15, 23, 31))
QWEN_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, mrope_section=(16, 24, 24))

# Where the ports live (a download of black-forest-labs/FLUX.1-dev and Qwen/Qwen2.5-VL-7B-Instruct, or their
# `bifrost port` Orbax outputs). Override on the command line: --config.flux.port_dir=...
FULL_PORTS = dict(flux="checkpoints/FLUX.1-dev/transformer", vae="checkpoints/FLUX.1-dev/vae",
                  t5="checkpoints/FLUX.1-dev/text_encoder_2", clip="checkpoints/FLUX.1-dev/text_encoder",
                  t5_tokenizer="checkpoints/FLUX.1-dev/tokenizer_2", clip_tokenizer="checkpoints/FLUX.1-dev/tokenizer",
                  qwen="checkpoints/Qwen2.5-VL-7B-Instruct")


def full_data(**overrides) -> ml_collections.ConfigDict:
    d = tiny_data(source="captions", data_dir="data/tfds", captions_source="data/images", image_resolution=512,
                  vae_resolution=512, random_crop=True, min_crop_scale=0.8, worker_count=8, num_threads=16,
                  prefetch_buffer_size=64)
    d.update(overrides)
    return d


def full_base(phase: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.phase = phase
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    c.train.update(steps=50_000, batch_size=256, log_every=50)
    c.optim.update(lr=1e-4, warmup_steps=1000, weight_decay=1e-2, clip_grad_norm=1.0)
    c.checkpoint.update(every=1000, keep=3)
    c.data = full_data()
    return c


def full_flux_family(phase: str, *, train_flux: bool):
    c = full_base(phase)
    big = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    add_flux_family(c, flux=FLUX_DEV, vae=FLUX_VAE, t5=T5_XXL, clip=CLIP_L, t5_max_length=512, clip_max_length=77,
                    flux_kw=dict(big, param_dtype="float32" if train_flux else "bfloat16",
                                 remat_policy="full" if train_flux else "none", port_dir=FULL_PORTS["flux"]),
                    text_kw=dict(big), vae_kw=dict(dtype="bfloat16", param_dtype="bfloat16", port_dir=FULL_PORTS["vae"],
                                                   remat_policy="none"))
    c.t5.port_dir, c.t5.tokenizer_dir = FULL_PORTS["t5"], FULL_PORTS["t5_tokenizer"]
    c.clip.port_dir, c.clip.tokenizer_dir = FULL_PORTS["clip"], FULL_PORTS["clip_tokenizer"]
    return c


def full_vision_section():
    return section(QWEN_VL_7B_VISION, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                    port_dir=FULL_PORTS["qwen"], resolution=448)
