"""Full-size generation config for ``bifrost aot --phase generate``: Qwen2.5-VL-7B MLLM with its
generation branch (256 CLIP-latent slots, 300-token prompts) + FLUX.1-dev with the 4 double / 1 single latent
ControlNet at 512 px, bf16 weights, scanned layers. Only the model shapes matter: AOT compiles with abstract weights.

    bifrost aot --config configs/full/generate_aot.py --phase generate --topology v5p:2x2x1   # needs libtpu
"""
import ml_collections

from bifrost_jax.train.phase_configs import FLUX_DEV, QWEN_VL_7B_TEXT, section


def get_config():
    c = ml_collections.ConfigDict()
    c.phase = "generate"
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    c.generate_batch = 0  # 0: one image per batch shard (data * fsdp)
    # the component sections of the training configs, bf16 weights, scanned layers
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    c.mllm = section(dict(text=QWEN_VL_7B_TEXT, num_image_tokens=256, image_grid=(16, 16)), base_dir="",
                     max_prompt_length=300, **kw)
    c.flux = section(dict(FLUX_DEV), **kw)
    c.controlnet = section({}, num_layers=4, num_single_layers=1, **dict(kw, scan_layers=False))
    c.t5 = ml_collections.ConfigDict(dict(max_length=512))
    # released defaults (docs/design.md §8.2): no MLLM-side CFG, FLUX distilled guidance 3.5, ControlNet scale 0.7
    c.sample = ml_collections.ConfigDict(dict(mllm_cfg=1.0, guidance=3.5, conditioning_scale=0.7))
    return c
