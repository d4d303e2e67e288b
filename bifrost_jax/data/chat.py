"""Qwen2.5-VL chat prompts for understanding: the chat template with images, and its token ids.

``render_chat`` writes the text of transformers' Qwen2.5-VL chat template (the processor's ``apply_chat_template``):
a default system turn "You are a helpful assistant." when the conversation does not start with one, then
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, an image item as
``<|vision_start|><|image_pad|><|vision_end|>`` in its place among the text items, and ``<|im_start|>assistant\\n``
to ask for the answer. ``chat_token_ids`` tokenises it and expands each ``<|image_pad|>`` into the image's number
of merged vision tokens (what the processor does with the text before tokenising).

Messages are dicts ``{"role": "system" | "user" | "assistant", "content": str | [item, ...]}``, an item being
``{"type": "image"}`` (the pixels travel separately, in order of appearance) or ``{"type": "text", "text": ...}``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from bifrost_jax.data.prompt import IM_END, IM_START, IMAGE_PAD, SYSTEM_PROMPT, VISION_END, VISION_START, Tokenizer

IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"


def user_message(text: str, num_images: int = 0) -> dict:
    """One user turn: ``num_images`` images first, then the text (VLMEvalKit's order for Qwen2.5-VL)."""
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def _content(content, where: str) -> tuple[str, int]:
    if isinstance(content, str):
        return content, 0
    text, images = [], 0
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "image":
            text.append(IMAGE_PLACEHOLDER)
            images += 1
        elif kind == "text":
            text.append(str(item.get("text", "")))
        else:
            raise ValueError(f"{where}: content item {j} must be {{'type': 'image'}} or {{'type': 'text', 'text': "
                             f"...}}, got {item!r}")
    return "".join(text), images


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True) -> tuple[str, int]:
    """(template text, number of images) of a conversation."""
    if not messages:
        raise ValueError("render_chat: no messages")
    parts, images = [], 0
    if messages[0].get("role") != "system":
        parts.append(f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"render_chat: message {i} has role {role!r}; use system | user | assistant")
        text, n = _content(m.get("content", ""), f"render_chat: message {i}")
        images += n
        parts.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), images


def chat_token_ids(tokenizer: Tokenizer, messages: Sequence[Mapping], image_token_counts: Sequence[int],
                   add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation, the i-th ``<|image_pad|>`` repeated ``image_token_counts[i]`` times."""
    text, n = render_chat(messages, add_generation_prompt)
    if n != len(image_token_counts):
        raise ValueError(f"the conversation holds {n} image(s) but {len(image_token_counts)} were given")
    pad = tokenizer.token_id(IMAGE_PAD)
    out, counts = [], iter(image_token_counts)
    for t in tokenizer.encode(text):
        out.extend([pad] * int(next(counts)) if t == pad else [t])
    return out
