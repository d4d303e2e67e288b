"""Text decoding speed (understanding): ``sample.text`` vs transformers ``generate``, same machine, same run.

A small random Qwen2.5-VL (saved with transformers, ported with ``port.load``) answers a batch of left-padded
prompts, each with one image (two image sizes in the batch), greedily for a fixed number of new tokens (no
end-of-sequence stop, so both generate every token). The script asserts that the generated tokens are identical,
then reports tokens/s (batch x new tokens / wall time, median of ``--repeats`` runs after one warm-up that
compiles) and the ratio. Float32 both.

    .venv/bin/python benchmarks/text_decode.py
    .venv/bin/python benchmarks/text_decode.py --batch 4 --new-tokens 64 --markdown text_decode.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bifrost_jax import port  # noqa: E402
from bifrost_jax.sample.text import DecodeOptions, Prompt, TextGenerator  # noqa: E402

IMG, VSTART, VEND, PAD = 1000, 1001, 1002, 0
TEXT = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
VISION = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=256, window_size=56,
              patch_size=14, fullatt_block_indexes=[1])


def reference_model(seed=0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(vision_config=dict(VISION), text_config=dict(TEXT), image_token_id=IMG,
                           video_token_id=1003, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 and "norm" in name else 0.05 * torch.randn_like(p))
    return model


def prompts(batch, prompt_len, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batch):
        grid = (1, 8, 8) if b % 2 == 0 else (1, 8, 12)
        n = grid[1] * grid[2] // 4
        text = int(prompt_len - n - 2 - 3 * (b % 3))  # varied lengths: left padding
        ids = [int(x) for x in rng.integers(1, 999, 4)] + [VSTART] + [IMG] * n + [VEND]
        ids += [int(x) for x in rng.integers(1, 999, text - 4)]
        out.append(Prompt(ids, [(rng.standard_normal((grid[1] * grid[2], 1176)).astype(np.float32), grid)]))
    return out


def hf_generate(model, batch_prompts, new_tokens):
    import torch
    length = max(len(p.ids) for p in batch_prompts)
    ids = np.full((len(batch_prompts), length), PAD, np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(batch_prompts):
        ids[r, length - len(p.ids):] = p.ids
        mask[r, length - len(p.ids):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(np.concatenate([p.images[0][0] for p in batch_prompts])),
                             image_grid_thw=torch.tensor([list(p.images[0][1]) for p in batch_prompts]),
                             mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
                             max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=PAD, eos_token_id=None)
    return out[:, length:].numpy()


def timed(fn, repeats):
    result = fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--markdown", default=None, help="also write the result table to this file")
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model = reference_model()
    path = tempfile.mkdtemp(prefix="text_decode_")
    model.save_pretrained(path)
    module, variables = port.load("qwen2.5-vl", path)
    batch = prompts(args.batch, args.prompt_len)
    gen = TextGenerator(module, variables, eos_ids=(-1,), pad_id=PAD, length_bucket=32, batch_size=args.batch)
    options = DecodeOptions(max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    ours, t_ours = timed(lambda: gen.generate_batch(batch, options), args.repeats)
    compile_s = time.perf_counter() - t0 - t_ours * (args.repeats + 1)
    ref, t_ref = timed(lambda: hf_generate(model, batch, args.new_tokens), args.repeats)
    same = np.array_equal(ours, ref)
    if not same:
        print("tokens differ:\n", ours, "\n", ref, file=sys.stderr)
        return 1
    n = args.batch * args.new_tokens
    rows = [
        f"Command: `.venv/bin/python benchmarks/text_decode.py --batch {args.batch} --prompt-len {args.prompt_len} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats}"
        + (f" --torch-threads {args.torch_threads}" if args.torch_threads else "") + "`  ",
        f"Machine: {platform.machine()} CPU, jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}.  ",
        f"Config: text hidden 256, 4 layers, 8 heads / 2 KV, vocab 4096; ViT depth 2; batch {args.batch} prompts of "
        f"<= {args.prompt_len} tokens with one image each (two grids), {args.new_tokens} new tokens greedy, float32. "
        "Generated tokens identical: yes.",
        "",
        "| | bifrost-jax `sample.text` | transformers `generate` | ratio |",
        "|---|---|---|---|",
        f"| wall time (median of {args.repeats}) | {t_ours:.3f} s | {t_ref:.3f} s | |",
        f"| tokens/s | {n / t_ours:.1f} | {n / t_ref:.1f} | **{t_ref / t_ours:.2f}x** |",
        f"| first call (compile + run) | {compile_s + t_ours:.1f} s | - | |",
    ]
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
