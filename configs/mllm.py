"""Tiny ``mllm`` phase (stage B, docs/design.md §6): train the generation branch of a tiny BifrostMLLM (random frozen
"Qwen" text model, branch initialised as its copy) to regress the CLIP latents of a tiny random vision tower (the
same fixed-key tower as the ``controlnet`` phase), with MAR masking and prompts built by ``build_t2i_prompt``.

    bifrost train --config configs/mllm.py --workdir runs/demo

With precomputed targets (same tower, centre crops; the cache is interchangeable with the controlnet phase's):

    bifrost cache-latents --config configs/mllm.py --out runs/demo/clip_latents.npy
    bifrost train --config configs/mllm.py --workdir runs/demo \
        --config.data.precomputed_clip_latents=runs/demo/clip_latents.npy

From the official Bifrost-1 checkpoint: --config.mllm.port_dir=DIR --config.mllm.base_dir=QWEN2.5-VL_DIR.
"""
import ml_collections

from bifrost_jax.train.phase_configs import tiny_base, tiny_mllm_section, tiny_vision_section


def get_config():
    c = tiny_base("mllm")
    c.mllm = tiny_mllm_section()
    # with mllm.port_dir = an official Bifrost-1 checkpoint: the Qwen2.5-VL directory it was built on
    c.mllm.base_dir = ""
    c.vision = tiny_vision_section()
    c.model = ml_collections.ConfigDict(dict(per_example_ratio=False))
    return c
