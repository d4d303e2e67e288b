"""FLUX.1 in Flax: the transformer, the stock and Bifrost-1 latent ControlNets (and, beside them, the VAE and the
latent upsampler)."""
from bifrost_jax.models.flux.controlnet import (FluxControlNetConfig, FluxControlNetModel, LatentControlNet,
                                                controlnet_from_transformer, controlnet_module)
from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel, residual_schedule

__all__ = ["FluxConfig", "FluxTransformer2DModel", "FluxControlNetConfig", "FluxControlNetModel", "LatentControlNet",
           "controlnet_from_transformer", "controlnet_module", "residual_schedule"]
