"""A tiny, randomly initialised Bifrost-1 pipeline for tests and smoke runs of generation and evaluation.

Every component is a few-kilobyte module in a section of the training configs' shape, with no weight source and
seeded synthetic weights (``init_noise`` makes the zero-initialised layers non-zero), so the images are noise, but
every stage runs: MAR decoding of a 4x6 CLIP grid, T5 + CLIP text, FLUX + latent ControlNet on an 8x12 packed
grid, VAE decode to 32x48 px, and the ViT for reconstruction (112x168 px views). Setting a section's ``port_dir``
or ``init_from`` loads real weights (``bifrost_jax.sample.build.BUILD_DOC``).

    bifrost generate --config configs/generate_tiny.py --random-weights --prompt "a red circle" --out /tmp/gen
    bifrost eval geneval --config configs/generate_tiny.py --random-weights --prompts evaluation_metadata.jsonl \
        --out /tmp/geneval
"""
import ml_collections

from bifrost_jax.data.shapes import COLORS, NUMBER_WORDS, RELATIONS, SHAPES
from bifrost_jax.train.phase_configs import section

HIDDEN = 32          # MLLM width = CLIP-latent width
GRID = (4, 6)        # CLIP-latent grid (non-square on purpose)
TEXT_DIM = 32        # T5 d_model = FLUX joint_attention_dim
POOLED_DIM = 32      # CLIP hidden = FLUX pooled_projection_dim
LATENT_CHANNELS = 4  # VAE latent channels; FLUX packs 2x2 -> 16


def _component(config, **fields):
    """A component section (the training configs' shape) with seeded synthetic weights (``init_noise``)."""
    return section(config, dtype="float32", param_dtype="float32", init_noise=0.05, **fields)


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.config_dict.placeholder(dict)  # None: no sharding (one device)

    words = list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBER_WORDS) + " ".join(RELATIONS).split()
    words += ["a", "an", "photo", "of", "and"]
    c.mllm = _component(
        dict(text=dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, mrope_section=(2, 1, 1)),
             num_image_tokens=GRID[0] * GRID[1], image_grid=GRID),
        base_dir="", tokenizer_dir="word", tokenizer_words=words, max_prompt_length=40)
    flux = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=16,
                joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
    c.flux = _component(dict(flux, num_layers=2, num_single_layers=2))
    c.controlnet = _component({}, num_layers=1, num_single_layers=1)  # shaped by flux and the mllm's grid
    c.vae = _component(dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                            latent_channels=LATENT_CHANNELS))
    c.t5 = _component(dict(vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                           feed_forward_proj="gated-gelu"), tokenizer_dir="hash", max_length=16)
    c.clip = _component(dict(vocab_size=64, hidden_size=POOLED_DIM, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=16, eos_token_id=63, bos_token_id=62,
                             pad_token_id=0), tokenizer_dir="hash", max_length=16)
    c.vision = _component(dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=HIDDEN,
                               window_size=56, fullatt_block_indexes=(1,)))

    c.sample = ml_collections.ConfigDict(dict(num_images_per_prompt=2, seed=42, mar_steps=4, mllm_cfg=1.0,
                                              flux_steps=3, guidance=3.5, conditioning_scale=0.7))
    return c
