"""Full-size ``controlnet`` phase (stage A, spec 9): latent ControlNet on frozen FLUX.1-dev, CLIP latents from the
frozen Qwen2.5-VL-7B vision tower (448 px ViT view -> 16x16 = 256 latents -> 32x32 FLUX tokens of the 512 px VAE
view of the same crop). Weights from ports (``config.<component>.port_dir``: diffusers/transformers directories or
``bifrost port`` outputs); the ControlNet is copied from FLUX (embedders + first blocks, zero heads).

Unknown in the release (spec 9): resolution, steps, batch, LR, data. Block counts: 4 double + 1 single, the
TrainingArguments defaults (spec 7.3; read hanlincs/Bifrost-1/flux_controlnet/config.json to settle).

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
                                                  remat_policy="full", port_dir="", init_from="", init_step=-1))
    c.train.update(batch_size=64)
    c.optim.update(lr=1e-5, warmup_steps=500)
    return c
