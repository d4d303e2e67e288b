"""bifrost-jax: Bifrost-1 (arXiv 2508.05954) in JAX/Flax.

A frozen Qwen2.5-VL with a trainable generation branch predicts patch-level CLIP latents by masked-autoregressive
decoding; a latent ControlNet feeds them into a frozen FLUX.1 transformer whose VAE decodes the image.
"""

__version__ = "0.1.0"
