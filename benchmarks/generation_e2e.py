"""End-to-end text-to-image generation per image: bifrost-jax's pipeline against the same pipeline in PyTorch, on the
same weights, prompts, MAR orders, FLUX noise and steps.

bifrost-jax: ``BifrostPipeline`` built from ``configs/generate_tiny.py`` widened to a small config (below), its four
jitted stages timed one by one (compile time reported apart: first call minus a steady call).
PyTorch, as a user of the official code runs it:

1. MAR: the official loop (``benchmarks/torch_reference.py``: transformers' Qwen2.5-VL layers, the full sequence every
   step, both weight sets on every token, the unconditional half computed) on the MLLM exported through the port;
2. text: transformers ``T5EncoderModel`` + ``CLIPTextModel`` from ``port.save`` directories, the same token ids;
3. denoising: FluxControlNetPipeline's loop (diffusers ``FluxTransformer2DModel`` + ``FluxControlNetModel`` with the
   latent ControlNet's weights from ``port.save("latent-controlnet")`` and its upsampler), flow-matching Euler on the
   pipeline's sigmas;
4. decoding: diffusers ``AutoencoderKL`` from ``port.save("flux-vae")``.

The script asserts that the CLIP latents and the final latents agree and reports per-stage medians, their ratio, and
the process CPU time (with ``--single-thread`` both frameworks use one thread, so CPU time is the work done whatever
else runs on a shared host).

    taskset -c 1 .venv/bin/python benchmarks/generation_e2e.py --single-thread --repeats 3
"""
from __future__ import annotations

import os
import sys

if "--single-thread" in sys.argv:  # before JAX creates its CPU client (pin the process too: taskset -c N)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch_reference  # noqa: E402
from bifrost_jax import port  # noqa: E402
from bifrost_jax.configs import load_config_file  # noqa: E402
from bifrost_jax.data.prompt import build_t2i_prompt  # noqa: E402
from bifrost_jax.models.bifrost import random_orders  # noqa: E402
from bifrost_jax.models.flux.vae import latent_image_ids  # noqa: E402
from bifrost_jax.port.base import export_mapped  # noqa: E402
from bifrost_jax.port.bifrost import TEXT_PREFIX, trained_key_map  # noqa: E402
from bifrost_jax.port.qwen_text import text_key_map  # noqa: E402
from bifrost_jax.sample.mar import mar_schedule, order_ranks  # noqa: E402
from bifrost_jax.sample.build import build_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, GRID = 128, (8, 8)
OVERRIDES = [  # configs/generate_tiny.py widened: MLLM 128 x 4 layers, 64 latents; FLUX 128 wide, 256 image tokens
    f"mllm.config.text.hidden_size={HIDDEN}", "mllm.config.text.intermediate_size=352",
    "mllm.config.text.num_hidden_layers=4", "mllm.config.text.num_attention_heads=4",
    "mllm.config.text.num_key_value_heads=2", "mllm.config.text.mrope_section=(8,4,4)",
    f"mllm.config.num_image_tokens={GRID[0] * GRID[1]}", f"mllm.config.image_grid={GRID}",
    "flux.config.num_attention_heads=4", "flux.config.attention_head_dim=32",
    "flux.config.axes_dims_rope=(8,12,12)", "flux.config.num_layers=2", "flux.config.num_single_layers=4",
    f"vision.config.out_hidden_size={HIDDEN}",
]  # the ControlNet follows FLUX's width and the MLLM's grid


def _median(fn, repeats):
    """(first-call wall s, median wall s, median CPU s, output) of ``fn`` (which must block until done)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, float(np.median(walls)), float(np.median(cpus)), out


def _block(x):
    return jax.block_until_ready(x)


def run(args) -> dict:
    torch.set_num_threads(1 if args.single_thread else os.cpu_count())
    config = load_config_file(os.path.join(REPO, "configs", "generate_tiny.py"), OVERRIDES)
    pipe = build_pipeline(config)
    prompts, k, seed = [args.prompt], args.images, 42
    mar_steps = pipe.mllm.config.num_image_tokens  # one token per step: the official setting
    # ---- bifrost-jax, stage by stage (the pipeline's own key use: per-prompt key -> (MAR key, noise key))
    keys = jnp.stack([jax.random.PRNGKey(seed)])
    split = jax.vmap(jax.random.split)(keys)
    mar_keys, noise_keys = split[:, 0], split[:, 1]
    jax_stages = {}
    jax_stages["mar"] = _median(lambda: _block(pipe.decode_latents(prompts, mar_keys, num_images_per_prompt=k,
                                                                    mar_steps=mar_steps, mllm_cfg=1.0)),
                                args.repeats)
    latents = jax_stages["mar"][3].reshape((-1,) + jax_stages["mar"][3].shape[2:])
    jax_stages["text"] = _median(lambda: _block(pipe._text(prompts)), args.repeats)
    embeds, pooled = (jnp.repeat(a, k, axis=0) for a in jax_stages["text"][3])
    noise = pipe.noise(noise_keys, k)
    o = pipe.options
    jax_stages["flux"] = _median(lambda: _block(pipe.sample_flux(
        latents, embeds, pooled, noise, flux_steps=args.flux_steps, guidance=o.guidance,
        conditioning_scale=o.conditioning_scale)), args.repeats)
    packed = jax_stages["flux"][3]
    jax_stages["vae"] = _median(lambda: _block(pipe.decode(packed)), args.repeats)
    images = np.asarray(jax_stages["vae"][3])

    # ---- PyTorch, same weights through the ports
    with tempfile.TemporaryDirectory() as d:
        m = pipe.mllm
        official = torch_reference.OfficialBifrostMLLM(m.config.text.to_hf_config(), m.config.num_image_tokens).eval()
        official.load_numpy_state(export_mapped(pipe.mllm_variables["params"], {
            **trained_key_map(m.config, m.scan_layers), **text_key_map(m.config.text, m.scan_layers, TEXT_PREFIX)}))
        enc = pipe.encode_text
        for kind, module, variables in (("t5-encoder", enc.t5, enc.t5_variables), ("clip-text", enc.clip,
                                                                                  enc.clip_variables),
                                        ("flux-transformer", pipe.transformer, pipe.transformer_variables),
                                        ("latent-controlnet", pipe.controlnet, pipe.controlnet_variables),
                                        ("flux-vae", pipe.vae, pipe.vae_variables)):
            port.save(kind, module, variables, os.path.join(d, kind))
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel
        t5 = T5EncoderModel.from_pretrained(os.path.join(d, "t5-encoder")).eval()
        clip = CLIPTextModel.from_pretrained(os.path.join(d, "clip-text")).eval()
        transformer = FluxTransformer2DModel.from_pretrained(os.path.join(d, "flux-transformer")).eval()
        controlnet, upsampler = torch_reference.load_latent_controlnet(os.path.join(d, "latent-controlnet"))
        vae = AutoencoderKL.from_pretrained(os.path.join(d, "flux-vae")).eval()

    ids, am = build_t2i_prompt(pipe.tokenizer, prompts, max_length=pipe.max_prompt_length)
    ids, am = np.repeat(ids, k, axis=0), np.repeat(am, k, axis=0)
    ranks = np.asarray(order_ranks(random_orders(mar_keys[0], k, m.config.num_image_tokens)))
    remaining = mar_schedule(m.config.num_image_tokens, mar_steps)
    torch_stages = {}
    torch_stages["mar"] = _median(lambda: torch_reference.mar_decode_official(official, ids, am, ranks, remaining),
                                  args.repeats)
    t5_ids = torch.tensor(np.asarray(enc.t5_tokenize(prompts)), dtype=torch.long)
    clip_ids = torch.tensor(np.asarray(enc.clip_tokenize(prompts)), dtype=torch.long)

    def text():
        with torch.no_grad():
            return t5(t5_ids).last_hidden_state, clip(clip_ids).pooler_output
    torch_stages["text"] = _median(text, args.repeats)
    t_embeds, t_pooled = (a.repeat_interleave(k, dim=0) for a in torch_stages["text"][3])
    h, w = pipe.packed_grid
    sigmas = pipe.sigmas(args.flux_steps)
    t_latents = torch_stages["mar"][3]
    torch_stages["flux"] = _median(lambda: torch_reference.flux_controlnet_sample(
        transformer, controlnet, upsampler, t_latents, t_embeds, t_pooled, torch.tensor(np.asarray(noise)), sigmas,
        torch.tensor(np.asarray(latent_image_ids(h, w))), torch.zeros(t_embeds.shape[1], 3),
        guidance=o.guidance, conditioning_scale=o.conditioning_scale), args.repeats)
    lh, lw = pipe.latent_hw
    torch_stages["vae"] = _median(lambda: torch_reference.vae_decode(vae, torch_stages["flux"][3], lh, lw),
                                  args.repeats)

    def err(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    agreement = dict(
        clip_latents=err(latents, torch_stages["mar"][3].numpy()),
        text_embeds=err(jax_stages["text"][3][0], torch_stages["text"][3][0].numpy()),
        packed_latents=err(packed, torch_stages["flux"][3].numpy()),
        image_max_abs_uint8=int(np.max(np.abs(images.astype(int) - torch_stages["vae"][3].numpy().astype(int)))))
    if agreement["clip_latents"] > 1e-3 or agreement["packed_latents"] > 1e-3:
        raise SystemExit(f"the two pipelines disagree: {agreement}")
    return dict(pipe=pipe, images=k, mar_steps=mar_steps, jax=jax_stages, torch=torch_stages, agreement=agreement)


def markdown(r, args) -> str:
    pipe = r["pipe"]
    t, f = pipe.mllm.config.text, pipe.transformer.config
    k = r["images"]
    lines = ["", "## End-to-end generation per image: bifrost-jax vs the same pipeline in PyTorch "
             "(`benchmarks/generation_e2e.py`)", "",
             f"Command: `.venv/bin/python benchmarks/generation_e2e.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), jax {jax.__version__}, torch "
             f"{torch.__version__}; threads per framework: {'1' if args.single_thread else 'all'}; load average at "
             f"the end {os.getloadavg()[0]:.1f}.  ",
             f"Config: MLLM hidden {t.hidden_size} x {t.num_hidden_layers} layers ({t.num_attention_heads} / "
             f"{t.num_key_value_heads} KV heads), N = {pipe.mllm.config.num_image_tokens} latents, "
             f"{r['mar_steps']} MAR "
             f"steps (one per token), cfg 1; FLUX {f.num_attention_heads} x {f.attention_head_dim} = {f.inner_dim} "
             f"wide, {f.num_layers} double + {f.num_single_layers} single blocks, ControlNet "
             f"{pipe.controlnet.config.num_layers} + {pipe.controlnet.config.num_single_layers}, "
             f"{pipe.packed_grid[0] * pipe.packed_grid[1]} image tokens, {args.flux_steps} Euler steps; "
             f"{pipe.image_size[0]}x{pipe.image_size[1]} px; 1 prompt x {k} images; float32; medians of "
             f"{args.repeats}. Agreement: CLIP latents max rel err {r['agreement']['clip_latents']:.1e}, final "
             f"latents {r['agreement']['packed_latents']:.1e}, images max |diff| "
             f"{r['agreement']['image_max_abs_uint8']}"
             " / 255.", "",
             "| stage | JAX ms / image | JAX CPU ms / image | JAX compile s | PyTorch ms / image | PyTorch CPU ms / "
             "image | PyTorch / JAX (wall) | (CPU) |", "|---|---|---|---|---|---|---|---|"]
    tot = dict(jw=0.0, jc=0.0, tw=0.0, tc=0.0, comp=0.0)
    for stage in ("mar", "text", "flux", "vae"):
        jf, jw, jc, _ = r["jax"][stage]
        _, tw, tc, _ = r["torch"][stage]
        comp = max(jf - jw, 0.0)
        for key, val in (("jw", jw), ("jc", jc), ("tw", tw), ("tc", tc), ("comp", comp)):
            tot[key] += val
        lines.append(f"| {stage} | {1e3 * jw / k:.1f} | {1e3 * jc / k:.1f} | {comp:.1f} | {1e3 * tw / k:.1f} | "
                     f"{1e3 * tc / k:.1f} | {tw / jw:.1f}x | {tc / jc:.1f}x |")
    lines.append(f"| **total** | **{1e3 * tot['jw'] / k:.1f}** | {1e3 * tot['jc'] / k:.1f} | {tot['comp']:.1f} | "
                 f"**{1e3 * tot['tw'] / k:.1f}** | {1e3 * tot['tc'] / k:.1f} | **{tot['tw'] / tot['jw']:.1f}x** | "
                 f"{tot['tc'] / tot['jc']:.1f}x |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--images", type=int, default=2, help="images of the prompt (one batch)")
    p.add_argument("--flux-steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--single-thread", action="store_true", help="one thread per framework (robust when shared)")
    p.add_argument("--markdown", help="write the RESULTS.md block to this file")
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    text = markdown(run(args), args)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
