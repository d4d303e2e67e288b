"""The ``understanding`` phase: a Qwen2.5-VL-architecture model (ViT + merger + language model) trained from scratch
as a VLM on the shapes data, standing in for Qwen2.5-VL's own pretraining at toy scale.

Every example is one image and one question about it in the chat template (``data/shapes_qa.py``: a caption, or
the colour, shape, count or position of an object), the kind drawn uniformly per example, or a conversation of
``language.questions_per_image`` turns about it; the loss is the
next-token cross-entropy on the answer tokens (and the ``<|im_end|>`` that ends them) only. The ViT sees exactly
the view the controlnet and mllm phases give it (``vision.resolution`` pixels, ``components.clip_latents_from_pixels``'
patchify): its merged outputs are the patch latents Bifrost predicts, and those phases take it from this phase's
checkpoint (``vision.init_from``; the mllm phase's language model through ``mllm.base_init_from``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bifrost_jax.components import component_key, relax_indivisible
from bifrost_jax.components.understanding import init_inputs, stored_params, understanding_model, vl_params
from bifrost_jax.data.preprocess import as_text
from bifrost_jax.data.prompt import load_tokenizer
from bifrost_jax.data.qwen_image import patchify
from bifrost_jax.data.shapes import parse_caption
from bifrost_jax.data.shapes_qa import encode_conversation, random_conversation, random_question
from bifrost_jax.data.sources import image_source, make_image_preprocess, train_iterator, word_tokenizer_dir
from bifrost_jax.models import flops
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.state import merge_params


def understanding_tokenizer(config):
    """The phase's tokenizer: ``language.tokenizer_dir``, or the word tokenizer of the shapes vocabulary (its
    question words included)."""
    return load_tokenizer(config.language.tokenizer_dir or word_tokenizer_dir(config.data, None))


class UnderstandingPhase(Phase):
    """Config: ``vision`` (the ViT section, ``resolution`` = its square view), ``language`` (``config``:
    QwenTextConfig fields; ``max_length`` of a training sequence; ``tokenizer_dir``, empty = the shapes word
    tokenizer; ``questions_per_image``: 1 = one question of a kind drawn uniformly (caption included), more = a
    conversation of that many turns, ``data/shapes_qa.random_conversation``), ``data`` (the shapes source;
    ``random_crop`` as the other phases). Everything trains."""

    name = "understanding"

    def __init__(self, config):
        super().__init__(config)
        if config.data.source != "shapes":
            raise ValueError(f"config.data.source={config.data.source!r}: the understanding phase asks questions "
                             "about shapes scenes (data/shapes_qa.py); use 'shapes'")
        self.tokenizer = understanding_tokenizer(config)
        self.model = understanding_model(config.vision, config.language, self.tokenizer)
        self.module = self.model.module
        self.max_length = int(config.language.max_length)

    def init_variables(self, rng):
        ids, pixels, grid = init_inputs(self.model)
        v = self.module.init(component_key(rng, "understanding"), ids, pixel_values=pixels, image_grid_thw=grid)
        return relax_indivisible({"params": stored_params(v["params"])})

    def is_trainable(self, path):
        return True

    def logits(self, params, batch):
        pixels = patchify(jnp.asarray(batch["vit_pixels"]).astype(jnp.float32), value_range=(0.0, 255.0),
                          patch_size=self.model.config.vision.patch_size,
                          temporal_patch_size=self.model.config.vision.temporal_patch_size,
                          merge_size=self.model.config.vision.spatial_merge_size)
        return self.module.apply({"params": vl_params(params)}, batch["input_ids"], batch["attention_mask"],
                                 pixel_values=pixels, image_grid_thw=self.model.grid_thw)

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        del rng
        logits = self.logits(merge_params(trainable, frozen), batch).astype(jnp.float32)[:, :-1]
        targets = batch["input_ids"][:, 1:]
        weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        count = jnp.maximum(jnp.sum(weight), 1.0)
        loss = jnp.sum(ce * weight) / count
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return loss, ({"answer_token_accuracy": jnp.sum(correct * weight) / count}, dict(mutable))

    def batch_spec(self, batch_size):
        r, t = int(self.config.vision.resolution), self.max_length
        return {"vit_pixels": jax.ShapeDtypeStruct((batch_size, r, r, 3), jnp.uint8),
                "input_ids": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
                "loss_mask": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}

    def dataset(self, *, global_batch_size, seed, process_index, process_count):
        d = self.config.data
        views = make_image_preprocess(vit_resolution=int(self.config.vision.resolution), random_crop=d.random_crop,
                                      min_crop_scale=d.min_crop_scale)
        tok, n_img, max_len = self.tokenizer, self.model.num_image_tokens, self.max_length
        turns = int(self.config.language.get("questions_per_image", 1))

        def preprocess(element, rng):
            out = views(element, rng)
            spec = parse_caption(as_text(element["caption"]))
            if turns == 1:
                _, q, a = random_question(spec, rng)
                conversation = [(q, a)]
            else:
                conversation = random_conversation(spec, rng, turns)
            out.update(encode_conversation(tok, conversation, n_img, max_len))
            return out

        return train_iterator(self.config, image_source(d), preprocess, global_batch_size=global_batch_size,
                              seed=seed, process_index=process_index, process_count=process_count)

    def tokens_per_example(self):
        return self.max_length

    def analytic_parts(self, batch_size):
        b, t = batch_size, self.max_length
        text = self.model.config.text
        return [flops.Part("vision tower (ViT)", flops.vision_tower(self.model.config.vision, self.model.grid_thw, b),
                           "train"),
                flops.Part("language model", flops.qwen_text_rows(text, b, t), "train"),
                flops.Part("lm head", flops.dense(b * t, text.hidden_size, text.vocab_size), "train")]
