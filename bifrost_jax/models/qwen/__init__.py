"""Qwen2.5-VL in Flax: the vision tower (``vision``), the language model with M-RoPE (``decoder``) and the full
conditional-generation model (``vl``)."""
