"""Tiny ``controlnet`` phase (stage A, docs/design.md §9): train the latent ControlNet on a frozen FLUX, with CLIP latents of a
frozen (tiny, random) Qwen2.5-VL vision tower computed on the fly from the ViT view of the same crop.

The demo starts FLUX and the VAE params-only from the ``flux`` and ``vae`` phases:

    bifrost train --config configs/controlnet.py --workdir runs/demo \
        --config.flux.init_from=runs/demo/flux/checkpoints --config.vae.init_from=runs/demo/vae/checkpoints

CLIP latents precomputed once instead of on the fly (centre crops only; the phase checks the cache's sidecar):

    bifrost cache-latents --config configs/controlnet.py --out runs/demo/clip_latents.npy
    ... --config.data.precomputed_clip_latents=runs/demo/clip_latents.npy

The same phase with a Stable Diffusion UNet decoder instead of FLUX: ``configs/unet_controlnet.py``.
"""
import ml_collections

from bifrost_jax.train.phase_configs import tiny_flux_family, tiny_vision_section


def get_config():
    c = tiny_flux_family("controlnet")
    c.decoder = "flux"  # the diffusion decoder the ControlNet steers (train/registry.py DECODER_PHASES)
    c.vision = tiny_vision_section()
    c.controlnet = ml_collections.ConfigDict(dict(num_layers=1, num_single_layers=1, from_transformer=True,
                                                  dtype="float32", param_dtype="float32", scan_layers=False,
                                                  remat_policy="none", port_dir="", init_from="", init_step=-1,
                                                  init_allow_unused=()))
    return c
