"""FLUX's text encoders: the T5 v1.1 encoder (``text_encoder_2``) and the CLIP text model (``text_encoder``)."""
from bifrost_jax.models.text.clip import CLIP_VIT_L_14, CLIPTextConfig, CLIPTextModel  # noqa: F401
from bifrost_jax.models.text.t5 import T5_V1_1_XXL, T5EncoderConfig, T5EncoderModel  # noqa: F401
