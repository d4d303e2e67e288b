"""Full-size ``controlnet`` phase (stage A, docs/design.md §9): latent ControlNet on frozen FLUX.1-dev, CLIP latents from the
frozen Qwen2.5-VL-7B vision tower (448 px ViT view -> 16x16 = 256 latents -> 32x32 FLUX tokens of the 512 px VAE
view of the same crop). Weights from ports (``config.<component>.port_dir``: diffusers/transformers directories or
``bifrost port`` outputs); the ControlNet is copied from FLUX (embedders + first blocks, zero heads).

Unknown in the release (docs/design.md §9): resolution, steps, batch, LR, data. Block counts: 4 double + 1 single, the
TrainingArguments defaults (docs/design.md §7.3; read hanlincs/Bifrost-1/flux_controlnet/config.json to settle).

    bifrost train --config configs/full/controlnet.py --workdir gs://bucket/run \
        --config.data.captions_source=/data/my_images --config.flux.port_dir=/ckpt/FLUX.1-dev/transformer ...
"""
import ml_collections

from bifrost_jax.train.phase_configs import full_flux_family, full_vision_section


def get_config():
    c = full_flux_family("controlnet", train_flux=False)
    c.vision = full_vision_section()
    c.controlnet = ml_collections.ConfigDict(dict(num_layers=4, num_single_layers=1, from_transformer=True,
                                                  dtype="bfloat16", param_dtype="float32", scan_layers=False,
                                                  remat_policy="full", port_dir="", init_from="", init_step=-1,
                                                  init_allow_unused=()))
    # Pure FSDP; the frozen FLUX under remat "dots_no_batch": its projections' outputs are saved (no FLUX forward
    # recomputed) and its weights re-gathered in the backward. With "none" the backward also keeps every layer's
    # all-gathered FLUX weight (22 GiB of bf16 under pure FSDP) and all activations: v5p-128 at fsdp=64, 54 GiB
    # per chip; fsdp=16 x tensor=4, 28 GiB (its v6e-64 compile needed more than a 23 GB host). With
    # "dots_no_batch" v6e-64 runs 1 per chip in 8.9 GiB at 181 examples/s (AOT table, benchmarks/RESULTS.md).
    # More per chip is faster: raise the batch.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.flux.remat_policy = "dots_no_batch"
    c.train.update(batch_size=64)
    c.optim.update(lr=1e-5, warmup_steps=500)
    return c
