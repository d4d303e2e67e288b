"""Tiny ``understanding`` phase: a Qwen2.5-VL-architecture model (ViT + merger + language model) trained from
scratch as a VLM on the shapes data (questions about colour, shape, count and position, and captions, in the chat
template; loss on the answers). Its ViT is the vision tower the controlnet and mllm phases then take
(``--config.vision.init_from=WORKDIR/understanding/checkpoints``), its language model the mllm phase's frozen base
(``--config.mllm.base_init_from=WORKDIR/understanding/checkpoints``).

    bifrost train --config configs/understanding.py --workdir runs/demo
"""
from bifrost_jax.train.phase_configs import tiny_base, tiny_language_section, tiny_vision_section


def get_config():
    c = tiny_base("understanding")
    c.vision = tiny_vision_section()
    c.language = tiny_language_section()
    return c
