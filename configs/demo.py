"""The embedded default: the whole Bifrost-1 system, tiny, trained from scratch on CPU on the built-in shapes data.

ONE file describes the demo: the model sizes every phase shares, per-phase steps / batch / learning rate, and the
generation and evaluation settings. ``bifrost_jax.demo`` turns it into the configs of the five phases
(``configs/{understanding,vae,flux,controlnet,mllm}.py``, whose other settings are kept) and runs them, two at a
time where one does not start from the other (``concurrent_phases``):

    understanding -> mllm (ViT and frozen language model from understanding)
    vae -> flux -> controlnet (FLUX and VAE from the phases before, the ViT from understanding)
    -> understanding before/after + generate + score

Data: the shapes dataset in its "fixed" layout (``data/shapes.fixed_placement``): the caption fixes where each
object goes, up to a +-2% jitter. The MLLM regresses CLIP latents with an MSE (docs/design.md §6), so with random positions its
prediction for a caption is the mean over positions, a near-blank canvas (measured: scores at chance); with the
layout fixed by the caption, a model this small trained for minutes learns colour and shape, and the held-out
colour-shape pairs still test composition.

Geometry (docs/design.md §7.1 item 3, the grids must align): shapes images rendered at 64 px; VAE view 32 px, VAE downsampling
2 -> 16x16x4 latents -> 2x2 packing -> 8x8 = 64 FLUX tokens; ViT view 112 px -> 8x8 patches of 14 px -> 2x2 merge
-> 4x4 = N = 16 CLIP latents -> the ControlNet's 2x upsampler -> 8x8 = the FLUX token grid.

Nothing pretrained exists offline, so the ``understanding`` phase stands in for Qwen2.5-VL's own pretraining: the
Qwen2.5-VL-architecture model (ViT + merger + language model) learns to answer questions about the shapes images
(``data/shapes_qa.py``). Its ViT is the vision tower whose latents the ControlNet reads and the MLLM predicts; its
language model is the MLLM's frozen base, the generation branch its copy. The T5 and CLIP text encoders stay frozen
at a random init; the word tokenizer is built from the dataset vocabulary (questions included).

With ``--config.decoder=unet`` a Stable Diffusion-architecture UNet (``models.unet``, trained from scratch by the
``unet`` phase) replaces FLUX and the latent UNet ControlNet steers it (docs/unet.md):
vae -> unet -> controlnet (configs/unet_controlnet.py: UNet and VAE from the two phases before) -> mllm. Same 16x16x4
latents; the 4x4 CLIP grid -> 8x8 upsampled -> one 2x stage of the condition embedding -> 16x16.

    make demo                                     # = bifrost demo --workdir runs/demo
    bifrost demo --workdir runs/demo [--fast] [--force PHASE] [--config.phases.flux.steps=800 ...]
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.decoder = "flux"              # or "unet": the UNet decoder variant (see the docstring)
    # One CPU device by default (tiny models: XLA's intra-op threads beat splitting the batch); tests run on 8
    # simulated devices, where fsdp=-1 takes them all.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    # shapes data, generated into WORKDIR/data on first use
    # layout "fixed": the caption fixes where each object goes (+-2% jitter), see data/shapes.fixed_placement
    c.data = ml_collections.ConfigDict(dict(image_resolution=64, vae_resolution=32, train_size=4096, shapes_seed=0,
                                            layout="fixed", jitter=0.02))

    # the shared model sizes (diffusers / transformers config.json fields)
    m = ml_collections.ConfigDict()
    m.vae = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                 norm_num_groups=8, sample_size=32, scaling_factor=1.0, shift_factor=0.0)
    m.flux = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                  axes_dims_rope=(8, 12, 12))
    m.t5 = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
    m.clip = dict(model_type="clip_text_model", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                  eos_token_id=0, bos_token_id=0, pad_token_id=0, projection_dim=64)
    m.text_max_length = 16
    m.vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=64, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,))
    m.vision_resolution = 112
    m.controlnet = dict(num_layers=1, num_single_layers=1)
    # the UNet decoder (--config.decoder=unet): text tokens from the CLIP encoder above (cross_attention_dim 64)
    m.unet = dict(sample_size=16, block_out_channels=(64, 128), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
                  norm_num_groups=16)
    m.unet_controlnet_channels = (32, 32)
    # the language model of the understanding phase and the mllm phase's frozen base (embeddings tied, as
    # Qwen2.5-VL-3B: the MLLM then holds the whole text path)
    # M-RoPE: a head of 16 has 8 frequency pairs; at Qwen's theta 1e6 with (4, 2, 2) the ones given to the image
    # rows and columns turn by 1e-3 rad per cell or less, so where an object sits barely reaches attention.
    # theta 10 with (2, 3, 3) turns them by 0.13 to 0.56 rad per cell (benchmarks/RESULTS.md, understanding phase).
    m.mllm_text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, rope_theta=10.0, mrope_section=(2, 3, 3),
                       tie_word_embeddings=True)
    m.understanding_max_length = 64  # one image (16 tokens), a question and its answer in the chat template
    m.understanding_questions_per_image = 1  # > 1: a conversation of that many turns per image
    m.mllm_max_prompt_length = 48
    c.models = m

    # per phase: optimizer steps, global batch, peak lr (linear warm-up, then cosine decay). Four schedules were run
    # from a clean clone on a quiet 2-core machine (benchmarks/RESULTS.md, "The embedded default in 10 minutes"):
    # this one scored best (held-out colour 1.00, overall 0.16; reconstruction colour 0.98, shape 0.52) in
    # 13.5 min; the fastest (understanding 900, vae 500 x 16, flux 400, controlnet 300: 10.7 min) fell to colour
    # 0.50, overall 0.06. Earlier sizing: the VAE roundtrip's shape score is the ceiling of every image below
    # (300 x 16 steps: 0.78, 800 x 32: 0.95), and the MLLM needs ~2500 x 32 steps to generalise colour to unseen
    # colour-shape pairs. MLLM lr 2e-3: final loss 0.0134 against 0.0170 at 1e-3 (random ViT), held-out colour 0.84
    # against 0.75 (same diffusion checkpoints, MAR 1).
    c.phases = ml_collections.ConfigDict()
    for name, steps, batch, lr in (("understanding", 1200, 32, 2e-3), ("vae", 500, 32, 2e-3), ("flux", 500, 32, 2e-3),
                                   ("unet", 600, 64, 2e-3), ("controlnet", 400, 32, 1e-3), ("mllm", 3000, 32, 2e-3)):
        c.phases[name] = ml_collections.ConfigDict(dict(steps=steps, batch_size=batch, lr=lr, warmup_steps=50))
    # the shapes layout a phase trains on, "" = data.layout
    c.phases.understanding.layout = ""
    # understanding, held-out shape 0.66 at 1200 steps with weight decay 0.05 against 0.38 at 600 without
    # (benchmarks/RESULTS.md, the understanding phase)
    c.phases.understanding.weight_decay = 0.05
    # the unconditional prompt "" (MLLM classifier-free guidance, generate.mllm_cfg > 1) must be seen in training
    c.phases.mllm.text_dropout = 0.1
    # and so must the UNet's (text classifier-free guidance of the UNet decoder: generate.guidance is its scale)
    c.phases.unet.text_dropout = 0.1
    # the controlnet and mllm phases read the frozen ViT's latents from a cache built once per run
    # (WORKDIR/demo/clip_latents.npy) instead of running the ViT every step
    c.cache_clip_latents = True
    c.log_every = 50
    # phases that do not start from each other train at once on threads: understanding -> mllm beside
    # vae -> flux, then controlnet. The vae, understanding and mllm steps are too small to keep two cores busy on
    # their own (the VAE step: 0.52 s on one core, 0.35 s on two): side by side the job holds 180-190% CPU
    # (benchmarks/RESULTS.md, "The embedded default in 10 minutes"). 1: one phase at a time, in order.
    c.concurrent_phases = 2
    c.fast_fraction = 0.2           # --fast: this fraction of every phase's steps (a quick look, not the numbers)

    # generation for held-out prompts (shapes "test" split: every prompt holds an unseen colour-shape pair).
    # MLLM CFG 1 (off): with the fixed layout the regressed latents are sharp already, and CFG 3 overshoots
    # (measured on one checkpoint set, 64 prompts: colour 0.69 at cfg 1, 0.27 at cfg 3).
    # MAR 1 step (all N latents in one parallel step): a deterministic MSE regressor gains nothing from its own
    # earlier predictions; on one checkpoint set colour 0.75 / shape 0.33 at 1 step, 0.62 / 0.38 at 16 steps.
    c.generate = ml_collections.ConfigDict(dict(num_prompts=64, images_per_prompt=1, seed=42, mar_steps=1,
                                                mllm_cfg=1.0, flux_steps=12, guidance=3.5, conditioning_scale=1.0,
                                                grid_prompts=16, batch=32))
    # also score FLUX alone (text only, ControlNet off) and reconstruction (GT image -> ViT -> ControlNet + FLUX)
    # understanding before/after: questions about this many held-out images (shapes "test" split)
    c.eval = ml_collections.ConfigDict(dict(flux_alone=True, reconstruction=True, understanding_images=128))
    return c
