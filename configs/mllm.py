"""Tiny ``mllm`` phase (stage B, spec 6): train the generation branch of a tiny BifrostMLLM (random frozen
"Qwen" text model, branch initialised as its copy) to regress the CLIP latents of a tiny random vision tower (the
same fixed-key tower as the ``controlnet`` phase), with MAR masking and prompts built by ``build_t2i_prompt``.

    bifrost train --config configs/mllm.py --workdir runs/demo
"""
import ml_collections

from bifrost_jax.train.phase_configs import tiny_base, tiny_mllm_section, tiny_vision_section


def get_config():
    c = tiny_base("mllm")
    c.mllm = tiny_mllm_section()
    c.vision = tiny_vision_section()
    c.model = ml_collections.ConfigDict(dict(per_example_ratio=False))
    return c
