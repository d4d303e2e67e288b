"""The understanding model of a checkpoint, and ``Chat``: a conversation with it (the notebook API).

``load_understanding(checkpoint, base=...)`` returns the ``QwenVLForConditionalGeneration`` and variables that
answer questions, from any of:

* a transformers Qwen2.5-VL directory (``config.json`` with ``model_type: qwen2_5_vl``);
* an official Bifrost-1 checkpoint (``learnable_pos_emb`` among its tensors) with ``base`` = the Qwen2.5-VL
  directory it was built on: its understanding path is the frozen Qwen2.5-VL inside (``port.load("bifrost-1")``'s
  ``module.vl``; the text weights are the checkpoint's, the ViT and LM head the checkpoint's or the base's);
* an ``mllm``-phase training WORKDIR: its checkpoints hold only the trained generation branch (frozen weights are
  never saved), so the understanding model is the run's start, read from the run's saved config
  (``mllm.port_dir`` / ``mllm.base_dir``); the run cannot have changed it (``tests/test_understanding.py`` checks
  the answers bit for bit after training).

The tokenizer comes from ``tokenizer`` or else the first of the checkpoint / start / base directories holding a
``tokenizer.json``.

    chat = Chat.from_checkpoint("Qwen2.5-VL-7B-Instruct")
    chat.ask("What is in this picture?", images=[PIL.Image.open("a.png")])
    chat.ask("And what colour is it?")       # the conversation goes on; chat.reset() starts again
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from bifrost_jax import port
from bifrost_jax.data.chat import user_message
from bifrost_jax.data.prompt import load_tokenizer
from bifrost_jax.models.bifrost import is_trainable as mllm_is_trainable
from bifrost_jax.port.base import SafetensorsReader, read_json
from bifrost_jax.sample.text import DecodeOptions, ImageOptions, TextGenerator
from bifrost_jax.checkpoint import checkpoint_dir, checkpoint_param_shapes, resolve_step_dir


@dataclasses.dataclass
class Understanding:
    """What ``load_understanding`` found: the model, its variables, a tokenizer (or None) and where they came
    from (for logs and result files)."""
    module: Any
    variables: Any
    tokenizer: Any
    source: str


def checkpoint_kind(path: str) -> str:
    """"qwen2.5-vl" | "bifrost-1" | "workdir", or a ValueError saying what ``path`` is not."""
    if os.path.isdir(os.path.join(path, "mllm", "checkpoints")):
        return "workdir"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: neither a model directory (no config.json) nor a training WORKDIR (no "
                         "mllm/checkpoints)")
    if read_json(os.path.join(path, "config.json")).get("model_type") == "qwen2_5_vl":
        return "qwen2.5-vl"
    if "learnable_pos_emb" in SafetensorsReader(path):
        return "bifrost-1"
    raise ValueError(f"{path}: config.json is not a Qwen2.5-VL one and there is no 'learnable_pos_emb' tensor "
                     "(not an official Bifrost-1 checkpoint)")


def _run_start(workdir: str) -> tuple[str, str]:
    """(mllm.port_dir, mllm.base_dir) of the latest mllm checkpoint of a WORKDIR, after checking that the
    checkpoint holds no frozen weight (those would have to be overlaid)."""
    step = resolve_step_dir(checkpoint_dir(workdir, "mllm"))
    config_file = os.path.join(str(step), "config", "metadata")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{step}: no saved config ({config_file}); cannot tell where the run started")
    with open(config_file) as fh:
        mllm = json.load(fh).get("mllm", {})
    frozen = [".".join(k) for k in checkpoint_param_shapes(step)
              if k[:2] == ("params", "mllm") and not mllm_is_trainable(k[2:]) or k[:2] == ("params", "vision")]
    if frozen:
        raise ValueError(f"{step} holds frozen weights ({frozen[:3]} ...); this loader expects them at the run's "
                         "start only")
    if not mllm.get("port_dir"):
        raise ValueError(f"{step}: the run started from random weights (no mllm.port_dir): it has no trained "
                         "understanding path")
    return mllm["port_dir"], mllm.get("base_dir", "") or ""


def load_understanding(checkpoint: str, *, base: Optional[str] = None, tokenizer: Optional[str] = None,
                       dtype=jnp.float32, compute_dtype=None, mesh=None) -> Understanding:
    """The understanding model of ``checkpoint`` (see the module docstring), weights sharded over ``mesh``."""
    kind = checkpoint_kind(checkpoint)
    source = checkpoint
    if kind == "workdir":
        start, run_base = _run_start(checkpoint)
        if not os.path.isdir(start):
            raise FileNotFoundError(f"{checkpoint}: the run started from mllm.port_dir={start}, which is not a "
                                    "directory here")
        if os.path.isfile(os.path.join(start, "port.json")):
            raise ValueError(f"{checkpoint}: the run started from a `bifrost port` Orbax output ({start}); chat "
                             "with the directory it was ported from instead")
        base = base or run_base or None
        checkpoint, kind = start, checkpoint_kind(start)
        source = f"{source} (started from {start})"
    kw = dict(dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    if kind == "qwen2.5-vl":
        module, variables = port.load("qwen2.5-vl", checkpoint, **kw)
    else:
        if not base:
            raise ValueError(f"{checkpoint} is an official Bifrost-1 checkpoint: give base=<the Qwen2.5-VL "
                             "directory it was built on> (--base)")
        pair, both = port.load("bifrost-1", checkpoint, base=base, **kw)
        module, variables = pair.vl, both["vl"]
    tok = None
    for d in [tokenizer] if tokenizer else [checkpoint, base]:
        if d and os.path.exists(os.path.join(d, "tokenizer.json") if os.path.isdir(d) else d):
            tok = load_tokenizer(d)
            break
    if tokenizer and tok is None:
        raise FileNotFoundError(f"no tokenizer.json at {tokenizer}")
    return Understanding(module, variables, tok, source)


class Chat:
    """A conversation with an understanding model: ``ask(text, images)`` appends the user turn (images first, then
    the text), answers, and keeps both in ``messages``."""

    def __init__(self, generator: TextGenerator, *, system: Optional[str] = None,
                 options: DecodeOptions = DecodeOptions(max_new_tokens=512), seed: int = 0):
        if generator.tokenizer is None:
            raise ValueError("Chat needs a TextGenerator with a tokenizer")
        self.generator, self.system, self.options, self.seed = generator, system, options, seed
        self.reset()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, base: Optional[str] = None, tokenizer: Optional[str] = None,
                        dtype=jnp.float32, compute_dtype=None, mesh=None, image_options: ImageOptions = ImageOptions(),
                        **kwargs) -> "Chat":
        u = load_understanding(checkpoint, base=base, tokenizer=tokenizer, dtype=dtype, compute_dtype=compute_dtype,
                               mesh=mesh)
        if u.tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json in {checkpoint} or its base; pass tokenizer=DIR")
        gen = TextGenerator(u.module, u.variables, tokenizer=u.tokenizer, mesh=mesh, batch_size=1,
                            image_options=image_options)
        return cls(gen, **kwargs)

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []

    def ask(self, text: str, images: Sequence = ()) -> str:
        messages = self.messages + [user_message(text, len(images))]
        answer = self.generator.chat(messages, self.images + list(images), self.options, self.seed)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images = self.images + list(images)
        return answer
