"""FLUX's real text tokenizers: a CLIP-style byte-level BPE (BOS + EOS, pad = EOS) and a T5-style Unigram (EOS
only, pad id 0) are built offline with the ``tokenizers`` library and saved in the transformers layout
(tokenizer.json + tokenizer_config.json), as a FLUX download's ``tokenizer/`` and ``tokenizer_2/``. Both of our
paths, the training side's ``PaddedTokenizer`` and the generation pipeline's ``hf_tokenizer``, give transformers'
ids (padding="max_length", truncation); the pipeline built with these directories encodes through them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bifrost_jax.configs import load_config_file
from bifrost_jax.data.tokenizers import hf_tokenizer
from bifrost_jax.sample.build import build_pipeline
from bifrost_jax.data.tokenizers import PaddedTokenizer
from test_pipeline import TINY

CORPUS = ["a photo of a red circle", "two blue squares above a green triangle", "three yellow stars",
          "a purple square to the left of an orange circle", "one black cat sitting on a white mat"] * 4
PROMPTS = ["a red circle", "", "two blue squares above a green triangle to the left of three yellow stars and more",
           "unseen words: zebra, quartz!"]


def _clip_style(path):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(path)
    return dict(vocab_size=tok.get_vocab_size(), bos=bos, eos=eos, pad=eos)


def _t5_style(path):
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return dict(vocab_size=tok.get_vocab_size(), eos=eos, pad=tok.token_to_id("<pad>"))


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_tokenizers")
    clip, t5 = str(root / "tokenizer"), str(root / "tokenizer_2")
    return {"clip": (clip, _clip_style(clip)), "t5": (t5, _t5_style(t5))}


def _transformers_ids(path, prompts, length):
    tok = AutoTokenizer.from_pretrained(path)
    return np.asarray(tok(prompts, padding="max_length", max_length=length, truncation=True)["input_ids"], np.int32)


@pytest.mark.parametrize("name,length", [("clip", 12), ("t5", 9)])
def test_our_tokenizers_give_transformers_ids(tokenizer_dirs, name, length):
    path, info = tokenizer_dirs[name]
    want = _transformers_ids(path, PROMPTS, length)
    assert want.shape == (len(PROMPTS), length)
    assert (want[2, :-1] != info["pad"]).all() and want[2, -1] == info["eos"]  # truncated, the EOS kept
    assert want[1, 0 if name == "t5" else 1] == info["eos"]  # the empty prompt
    if name == "clip":
        assert (want[:, 0] == info["bos"]).all()
    padded = PaddedTokenizer(path, length)
    assert padded.pad_id == info["pad"] and padded.vocab_size == info["vocab_size"]
    np.testing.assert_array_equal(padded(PROMPTS), want)
    np.testing.assert_array_equal(hf_tokenizer(path, length)(PROMPTS), want)


def test_pipeline_encodes_with_the_tokenizer_directories(tokenizer_dirs):
    """``config.t5.tokenizer_dir`` / ``config.clip.tokenizer_dir`` = the directories: the pipeline's text embeddings are the
    encoders' outputs on transformers' ids (T5 all tokens, CLIP pooled at the EOS)."""
    (clip_dir, clip), (t5_dir, t5) = tokenizer_dirs["clip"], tokenizer_dirs["t5"]
    config = load_config_file(TINY, [
        f"t5.tokenizer_dir={t5_dir}", "t5.max_length=9", f"t5.config.vocab_size={t5['vocab_size']}",
        f"clip.tokenizer_dir={clip_dir}", "clip.max_length=12", f"clip.config.vocab_size={clip['vocab_size']}",
        f"clip.config.eos_token_id={clip['eos']}", f"clip.config.bos_token_id={clip['bos']}",
        f"clip.config.pad_token_id={clip['pad']}", "clip.config.max_position_embeddings=12"])
    pipe = build_pipeline(config)
    embeds, pooled = pipe.encode_text(PROMPTS)
    enc = pipe.encode_text
    t5_ids, clip_ids = _transformers_ids(t5_dir, PROMPTS, 9), _transformers_ids(clip_dir, PROMPTS, 12)
    want_embeds = jax.jit(enc.t5.apply)(enc.t5_variables, jnp.asarray(t5_ids))
    _, want_pooled = jax.jit(enc.clip.apply)(enc.clip_variables, jnp.asarray(clip_ids))
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(want_embeds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(want_pooled), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(pooled[0]) - np.asarray(pooled[3])).max() > 1e-3  # the prompt reaches the output
