"""FSDP and remat: with remat policy "none" the backward keeps every layer's GATHERED weight alive (the dot's
input gradient needs it), i.e. the unsharded model on every device; "dots_no_batch" (save the outputs of matmuls
without batch dimensions: the projections) keeps activations but re-gathers the weights in the backward, at the
cost of recomputing the attention products and elementwise work.

Found by ``bifrost aot``: the full-size mllm phase with remat "none" on v6e:8x8 (fsdp=64) compiled to
19.5 GiB of temporaries per chip, ~12.6 of them the 28 layers' gathered bf16 branch weights (bf16[28,3584,18944]
buffers in the compiled HLO). JAX's ``save_anything_except_these_names`` cannot express "all but the weights" (in
jax 0.10.2 it saves everything), and names on the weights do not stop the cast feeding them from being saved.

Checked here on a scanned Qwen decoder over an 8-device fsdp mesh (CPU): the gradients are identical, and the
compiled per-device temporaries drop by at least 80% of the gathered weights' size."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bifrost_jax.models.qwen.decoder import QwenLanguageModel, QwenTextConfig
from bifrost_jax.nn.stack import REMAT_POLICIES
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.parallel.rules import axis_rules, tree_shardings

CFG = QwenTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, mrope_section=(8, 12, 12))
B, L = 8, 16


def _compiled_grads(policy: str, mesh):
    model = QwenLanguageModel(CFG, dtype=jnp.bfloat16, param_dtype=jnp.float32, scan_layers=True,
                              remat_policy=policy)
    embeds = jax.random.normal(jax.random.key(0), (B, L, CFG.hidden_size), jnp.float32)
    with axis_rules(mesh):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(1), inputs_embeds=embeds))
        shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)
        params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(1), inputs_embeds=embeds)),
                         out_shardings=shardings)()

        def loss(p, x):
            return jnp.mean(jnp.square(model.apply(p, inputs_embeds=x).astype(jnp.float32)))

        fn = jax.jit(jax.grad(loss), in_shardings=(shardings, None), out_shardings=shardings)
        compiled = fn.lower(params, embeds).compile()
        grads = compiled(params, embeds)
    return compiled.memory_analysis().temp_size_in_bytes, grads


def test_dots_no_batch_regathers_instead_of_keeping_gathered_weights():
    assert "dots_no_batch" in REMAT_POLICIES
    mesh = make_mesh({"fsdp": 8})
    temp_none, g_none = _compiled_grads("none", mesh)
    temp_dots, g_dots = _compiled_grads("dots_no_batch", mesh)
    # the layers' kernels gathered in bf16: q, k, v, o + gate, up, down, per layer
    c = CFG
    kv = c.num_key_value_heads * c.head_dim
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    gathered_bytes = 2 * per_layer * c.num_hidden_layers
    assert temp_none - temp_dots >= 0.8 * gathered_bytes, (temp_none, temp_dots, gathered_bytes)
    for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_dots)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-7)
