"""Text encoders: the T5 v1.1 encoder (FLUX ``text_encoder_2``), the CLIP text model (FLUX's and SD's
``text_encoder``) and its projection variant (SDXL ``text_encoder_2``)."""
from bifrost_jax.models.text.clip import (CLIP_VIT_L_14, CLIPTextConfig, CLIPTextModel,  # noqa: F401
                                          CLIPTextModelWithProjection)
from bifrost_jax.models.text.t5 import T5_V1_1_XXL, T5EncoderConfig, T5EncoderModel  # noqa: F401
