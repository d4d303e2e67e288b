"""Sampling: MAR decoding of the CLIP latents with the MLLM (``mar``), FLUX flow-matching sampling (``flow``)."""
