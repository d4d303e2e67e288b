"""Stable Diffusion family UNets (SD 1.x, 2.x, SDXL) and their ControlNets, NHWC."""
from bifrost_jax.models.unet.config import SD15, SD21, SDXL, UNet2DConditionConfig  # noqa: F401
from bifrost_jax.models.unet.unet import UNet2DConditionModel, skip_shapes  # noqa: F401
from bifrost_jax.models.unet.controlnet import (LatentUNetControlNet, UNetControlNetConfig,  # noqa: F401
                                                UNetControlNetModel, controlnet_from_unet, controlnet_module)
