"""``bifrost chat`` and the ``Chat`` API on a tiny random Qwen2.5-VL directory with a word-level tokenizer.

The one-shot answer for two images of different sizes equals the decoded greedy tokens of transformers'
``generate`` on the same chat-template ids and pixels; the interactive mode answers each question of a
conversation (the second turn sees the first); the checkpoint kinds are recognised and bad ones named.
"""
import io
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from bifrost_jax import cli
from bifrost_jax.chat import repl
from bifrost_jax.data.chat import chat_token_ids, render_chat, user_message
from bifrost_jax.data.prompt import IM_END, build_word_tokenizer, load_tokenizer
from bifrost_jax.models.qwen.vision import QwenVisionConfig
from bifrost_jax.models.qwen.vl import QwenVLConfig, QwenVLForConditionalGeneration
from bifrost_jax.port.qwen import abstract_vl, save_qwen_vl
from bifrost_jax.sample.text import DecodeOptions, ImageOptions, TextGenerator, prepare_image
from bifrost_jax.sample.understanding import Chat, checkpoint_kind, load_understanding

WORDS = "what is in the picture a red blue circle square yes no answer".split()
VISION = QwenVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                          window_size=56, fullatt_block_indexes=(1,))
PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from bifrost_jax.models.qwen.decoder import QwenTextConfig
    path = str(tmp_path_factory.mktemp("chat_qwen"))
    tok = load_tokenizer(build_word_tokenizer(WORDS, path))
    text = QwenTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=tok.vocab_size, rope_theta=10000.0,
                          mrope_section=(2, 3, 3), eos_token_id=tok.token_id(IM_END), bos_token_id=None)
    cfg = QwenVLConfig(vision=VISION, text=text, image_token_id=tok.token_id("<|image_pad|>"),
                       vision_start_token_id=tok.token_id("<|vision_start|>"),
                       vision_end_token_id=tok.token_id("<|vision_end|>"))
    vl = QwenVLForConditionalGeneration(cfg, dtype=np.float32)
    shapes, _ = abstract_vl(vl)
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (r.normal(size=s.shape) * 0.3).astype(np.float32), shapes["params"])
    save_qwen_vl(vl, {"params": params}, path)
    images = []
    for i, size in enumerate(((56, 84), (112, 56))):
        file = os.path.join(path, f"image_{i}.png")
        Image.fromarray(r.integers(0, 256, size + (3,), dtype=np.uint8)).save(file)
        images.append(file)
    return path, images


def _cli(argv, capsys):
    assert cli.main(["chat", *argv]) == 0
    return capsys.readouterr().out


def test_one_shot_answer_equals_transformers_generate(qwen_dir, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration
    path, images = qwen_dir
    question = "what is in the picture ?"
    out = _cli(["--checkpoint", path, "--image", images[0], "--image", images[1], "--prompt", question,
                "--max-new-tokens", "6", "--dtype", "float32", "--min-pixels", str(PIXELS["min_pixels"]),
                "--max-pixels", str(PIXELS["max_pixels"])], capsys)
    tok = load_tokenizer(path)
    prepared = [prepare_image(Image.open(f), ImageOptions(**PIXELS)) for f in images]
    assert prepared[0][1] != prepared[1][1]  # two grids
    ids = chat_token_ids(tok, [user_message(question, 2)], [g[1] * g[2] // 4 for _, g in prepared])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        ref = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                             pixel_values=torch.tensor(np.concatenate([p for p, _ in prepared])),
                             image_grid_thw=torch.tensor([list(g) for _, g in prepared]),
                             mm_token_type_ids=(ids_t == model.config.image_token_id).long(), max_new_tokens=6,
                             do_sample=False, eos_token_id=tok.token_id(IM_END), pad_token_id=tok.pad_id)
    want = tok.decode(ref[0, len(ids):].tolist(), skip_special_tokens=True)
    assert want.strip() and out.strip() == want.strip()
    assert render_chat([user_message(question, 2)])[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<|vision_start|><|image_pad|><|vision_end|>" * 2 + question + "<|im_end|>\n<|im_start|>assistant\n")


def test_interactive_conversation(qwen_dir):
    path, images = qwen_dir
    chat = Chat.from_checkpoint(path, options=DecodeOptions(max_new_tokens=4), image_options=ImageOptions(**PIXELS))
    stdin = io.StringIO(f"/image {images[0]}\nwhat is in the picture\nis it red\n/reset\nis it red\n/quit\n")
    stdout = io.StringIO()
    repl(chat, [], stdin, stdout)
    answers = [line[2:] for line in stdout.getvalue().split("\n") if line.startswith("> ") and len(line) > 2]
    assert "(new conversation)" in stdout.getvalue()
    assert len(chat.messages) == 2 and chat.images == []  # after /reset: one question, one answer
    # the first turn's answer is what a fresh conversation answers; "is it red" differs with and without history
    fresh = Chat.from_checkpoint(path, options=DecodeOptions(max_new_tokens=4), image_options=ImageOptions(**PIXELS))
    first = fresh.ask("what is in the picture", [Image.open(images[0])])
    with_history = fresh.ask("is it red")
    fresh.reset()
    alone = fresh.ask("is it red")
    assert "(1 image(s) for the next question)" in stdout.getvalue()
    assert [a for a in answers if not a.startswith("(")][:3] == [first, with_history, alone]


def test_checkpoint_kinds_and_errors(qwen_dir, tmp_path):
    path, _ = qwen_dir
    assert checkpoint_kind(path) == "qwen2.5-vl"
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint_kind(str(tmp_path))
    u = load_understanding(path)
    assert u.tokenizer is not None and u.module.config.text.num_hidden_layers == 2
    gen = TextGenerator(u.module, u.variables, tokenizer=u.tokenizer, image_options=ImageOptions(**PIXELS))
    assert gen.eos_ids == (u.tokenizer.token_id(IM_END),)
    with pytest.raises(SystemExit, match="cannot read image"):
        cli.main(["chat", "--checkpoint", path, "--image", str(tmp_path / "missing.png"), "--prompt", "x"])
