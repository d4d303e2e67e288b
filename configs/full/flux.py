"""Full-size ``flux`` phase: fine-tune FLUX.1-dev (or, without ``flux.port_dir``, train that architecture from
scratch) with flow matching on 512 px images; T5-XXL, CLIP-L and the FLUX VAE frozen (bf16). Not part of the
released Bifrost-1 recipe (FLUX stays frozen there); provided for completeness and the embedded default.
"""
from bifrost_jax.train.phase_configs import full_flux_family


def get_config():
    c = full_flux_family("flux", train_flux=True)
    c.train.update(batch_size=64)
    c.optim.update(lr=1e-5, warmup_steps=500)
    return c
