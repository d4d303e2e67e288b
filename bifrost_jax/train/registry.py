"""The training phases by name: ``config.phase`` selects one (``bifrost train``, ``bifrost aot``, cache-latents)."""
from __future__ import annotations

import ml_collections

from bifrost_jax.train.flux_phases import ControlNetPhase, FluxPhase
from bifrost_jax.train.mllm_phase import MllmPhase
from bifrost_jax.train.phases import Phase
from bifrost_jax.train.toy import ToyPhase
from bifrost_jax.train.understanding_phase import UnderstandingPhase
from bifrost_jax.train.unet_phases import UNetControlNetPhase, UNetPhase
from bifrost_jax.train.vae_phase import VaePhase

PHASES: dict[str, type[Phase]] = {
    "toy": ToyPhase,
    "vae": VaePhase,
    "flux": FluxPhase,
    "controlnet": ControlNetPhase,
    "mllm": MllmPhase,
    "unet": UNetPhase,
    "understanding": UnderstandingPhase,
}
# phases that exist per diffusion decoder (``config.decoder``, default "flux")
DECODER_PHASES: dict[str, dict[str, type[Phase]]] = {"controlnet": {"flux": ControlNetPhase,
                                                                    "unet": UNetControlNetPhase}}


def get_phase(config: ml_collections.ConfigDict) -> Phase:
    """The phase named by ``config.phase``, built from the config."""
    name = config.phase
    if name not in PHASES:
        raise ValueError(f"config.phase={name!r} is not a registered phase; known: {sorted(PHASES)}")
    if name in DECODER_PHASES:
        decoder = config.get("decoder", "flux")
        if decoder not in DECODER_PHASES[name]:
            raise ValueError(f"config.decoder={decoder!r} is not a decoder of phase {name!r}; known: "
                             f"{sorted(DECODER_PHASES[name])}")
        return DECODER_PHASES[name][decoder](config)
    return PHASES[name](config)
