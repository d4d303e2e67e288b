"""``bifrost port`` for the FLUX-side kinds, float32 and ``--dtype bfloat16``: the Orbax output restores to exactly
what ``bifrost_jax.port.load`` gives for the same directory and dtype (float32: the exported weights themselves),
and ``port.json`` records the kind, the source and its config.json. The PyTorch-format sources are written by our
exporters from the tiny random pipeline of configs/generate_tiny.py (their parity with diffusers / transformers is
tested per family)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bifrost_jax import cli, port
from bifrost_jax.configs import load_config_file
from bifrost_jax.port.orbax_io import restore_ported
from bifrost_jax.sample.build import build_pipeline
from test_pipeline import TINY

# kind -> (module attribute, variables attribute) of BifrostPipeline (text encoders: of its FluxTextEncoder)
KINDS = {"flux-transformer": "transformer", "latent-controlnet": "controlnet", "flux-vae": "vae", "t5-encoder": "t5",
         "clip-text": "clip"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """kind -> (exported directory, the exported variables)."""
    pipe = build_pipeline(load_config_file(TINY))
    root = tmp_path_factory.mktemp("port_sources")
    out = {}
    for kind, name in KINDS.items():
        owner = pipe.encode_text if name in ("t5", "clip") else pipe
        module, variables = getattr(owner, name), getattr(owner, f"{name}_variables")
        path = str(root / kind)
        port.save(kind, module, variables, path)
        out[kind] = (path, jax.device_get(variables))
    return out


def _assert_same_tree(got, want, dtype):
    flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want):
        g, w = np.asarray(g), np.asarray(w)
        if np.issubdtype(w.dtype, np.floating):
            assert g.dtype == dtype or "batch_stats" in jax.tree_util.keystr(path), (path, g.dtype)
        np.testing.assert_array_equal(g.astype(np.float32), w.astype(np.float32), err_msg=str(path))


@pytest.mark.parametrize("kind,dtype", [("flux-transformer", "float32"), ("latent-controlnet", "float32"),
                                        ("flux-vae", "bfloat16"), ("t5-encoder", "bfloat16"),
                                        ("clip-text", "float32"), ("latent-controlnet", "bfloat16")])
def test_port_command_equals_port_load(sources, tmp_path, kind, dtype):
    src, exported = sources[kind]
    out = tmp_path / "ported"
    args = ["port", "--kind", kind, "--src", src, "--out", str(out)] + (["--dtype", dtype] if dtype != "float32"
                                                                         else [])
    assert cli.main(args) == 0
    restored = restore_ported(str(out))
    _, loaded = port.load(kind, src, dtype=getattr(jnp, dtype))
    _assert_same_tree(restored, jax.device_get(loaded), np.dtype(getattr(jnp, dtype)))
    if dtype == "float32":
        _assert_same_tree(restored, exported, np.dtype(np.float32))
    else:  # the weights rounded once to bf16, nothing else
        _assert_same_tree(restored, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16)
                                                 if np.issubdtype(np.asarray(x).dtype, np.floating) else x, exported),
                          np.dtype(jnp.bfloat16))
    info = json.loads((out / "port.json").read_text())
    assert info["kind"] == kind and info["source"] == src
    assert info["hf_config"] == json.loads(open(f"{src}/config.json").read())
    # a second port into the same directory is refused, naming it
    with pytest.raises(FileExistsError, match="variables"):
        cli.main(args)
