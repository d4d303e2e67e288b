"""One KV-cached text decode step of the understanding path at full size (Qwen2.5-VL-7B's language model), for
``bifrost aot --phase text-decode``: per-chip memory (bf16 weights + the cache) and the compiler's tokens/s.

    bifrost aot --config configs/full/text_decode_aot.py --topology v5p:2x2x1    # v5p-8 (4 chips); needs libtpu
    bifrost aot --config configs/full/text_decode_aot.py --topology v6e:2x4      # v6e-8
"""
import ml_collections

from bifrost_jax.train.phase_configs import QWEN_VL_7B_TEXT, QWEN_VL_7B_VISION, section


def get_config():
    c = ml_collections.ConfigDict()
    c.phase = "text-decode"
    # 4-way tensor-parallel heads (28 query / 4 key-value heads), the rest of the chips data-parallel over the rows:
    # a decode step is bound by reading the weights, so FSDP's per-step all-gathers cost more than replicas
    # (v6e-8 with fsdp=2: 9.3 ms per step against 2.9 ms with data=2)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=4, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    c.mllm = section(dict(text=QWEN_VL_7B_TEXT), dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    c.vision = section(QWEN_VL_7B_VISION)
    # 64 rows per step, 2048 cached tokens each (a 1,792-token prompt with images + 256 new tokens)
    c.decode = ml_collections.ConfigDict(dict(batch=64, cache_length=2048))
    return c
