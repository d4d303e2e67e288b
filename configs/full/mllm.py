"""Full-size ``mllm`` phase (stage B, docs/design.md §6): the generation branch of Qwen2.5-VL-7B (frozen language model and
ViT from ``mllm.port_dir``; branch copied from the loaded weights), 448 px ViT view -> 256 CLIP-latent targets,
300-token left-padded prompts, MAR masking (truncated normal on [0.7, 1], mean 1, std 0.25), MSE on all slots.
Hyper-parameters from the experiment names of docs/design.md §6.3 (lr 5e-4, 5k warm-up, 50k steps); batch unknown.
"""
import ml_collections

from bifrost_jax.train.phase_configs import (FULL_PORTS, QWEN_VL_7B_TEXT, section, full_base,
                                             full_vision_section)


def get_config():
    c = full_base("mllm")
    c.mllm = section(dict(text=QWEN_VL_7B_TEXT, num_image_tokens=256, image_grid=(16, 16), mask_ratio_min=0.7,
                           mask_ratio_max=1.0, mask_ratio_mean=1.0, mask_ratio_std=0.25),
                      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="dots_no_batch",
                      port_dir=FULL_PORTS["qwen"], tokenizer_dir=FULL_PORTS["qwen"], max_prompt_length=300)
    # Starting from the official Bifrost-1 checkpoint instead: --config.mllm.port_dir=checkpoints/Bifrost-1
    # --config.mllm.base_dir=checkpoints/Qwen2.5-VL-7B-Instruct (every branch weight then comes from it)
    c.mllm.base_dir = ""
    c.vision = full_vision_section()
    c.model = ml_collections.ConfigDict(dict(per_example_ratio=False))
    c.data.update(vae_resolution=0, text_dropout=0.0)
    # FSDP x tensor=4, remat "dots_no_batch": the fastest mllm layout of the AOT table at 2 and 8 per chip, within
    # 4% of pure FSDP at 16 per chip (benchmarks/RESULTS.md; v5p-128 at 2 per chip: 571 examples/s vs 405 for
    # pure FSDP). The remat policy saves the projections' outputs (no matmul recomputed) but not the weights: with
    # "none" the backward keeps every layer's all-gathered weight, the whole bf16 branch (~12.6 GiB under pure
    # FSDP), on every chip. Throughput grows with the per-chip batch (weight all-gathers amortised): v6e-64 at
    # 2 / 16 per chip ~560 / ~1200-1260 examples/s. The batch is the paper's unknown: 128 here.
    # On the smallest slices (v5p:2x2x1, v6e:2x4) use --config.mesh.tensor=1 --config.mllm.remat_policy=full.
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    c.train.update(batch_size=128)
    # The frozen 7.07B-parameter Qwen language model in bf16 (the released weights' own dtype: nothing is lost)
    # while the trained branch keeps fp32 master weights (mllm.param_dtype): 26.3 -> 13.2 GiB of frozen weights
    # over the mesh (0.21 GiB per device on 64, 3.3 GiB per chip on a 4-chip slice). "" keeps them fp32.
    c.train.frozen_param_dtype = "bfloat16"
    c.optim.update(lr=5e-4, warmup_steps=5000)
    return c
