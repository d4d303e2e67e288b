"""Port of pytorch-fid's Inception-v3 weights (port kind "inception-fid") to ``models.inception.InceptionV3FID``.

    module, variables = bifrost_jax.port.load("inception-fid", "pt_inception-2015-12-05-6726825d.pth")
    features = module.apply(variables, images_uint8)                       # (B, 2048)

The weights are the user's file (no download here): pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a
torch state dict, read with ``torch.load(weights_only=True)``; torch is in the ``port`` extra and imported only
for this format), or a ``.safetensors`` file (or a directory holding one) with the same keys, read without torch.

Keys are torchvision's ``Inception3`` names, which the Flax module keeps: ``Mixed_6b.branch7x7_2.conv.weight`` is
``params/Mixed_6b/branch7x7_2/conv/kernel`` (OIHW -> HWIO), ``.bn.weight``/``.bn.bias`` are ``bn/scale``/``bn/bias``,
``.bn.running_mean``/``.bn.running_var`` are ``batch_stats/.../bn/mean``/``var``, ``fc.weight``/``fc.bias`` the
1008-way ``fc`` (transposed). ``*.num_batches_tracked`` counters are ignored when present. Every other difference
(a missing, unexpected or wrong-shape key: an ``AuxLogits.*`` head, a 1000-class ``fc`` of torchvision's ImageNet
weights) raises ``PortError`` naming the keys.
"""
from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np

from bifrost_jax.models.inception import InceptionV3FID
from bifrost_jax.port.base import (CONV2D, IDENTITY, LINEAR, KeyMap, PortError, SafetensorsReader, abstract_params,
                                   export_mapped, flatten, load_mapped, mesh_shardings, src, write_safetensors)

KIND = "inception-fid"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file (FID_WEIGHTS_URL), for messages
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_LEAF_NAMES = {  # (collection, Flax leaf) -> torch suffix, transform
    ("params", "scale"): ("weight", IDENTITY),
    ("params", "bias"): ("bias", IDENTITY),
    ("batch_stats", "mean"): ("running_mean", IDENTITY),
    ("batch_stats", "var"): ("running_var", IDENTITY),
}


def inception_key_map(expected_variables) -> KeyMap:
    """Flax variable path (collection first) -> torch key, for every leaf of ``InceptionV3FID``'s variables."""
    out: KeyMap = {}
    for path, leaf in flatten(expected_variables).items():
        collection, module, name = path[0], ".".join(path[1:-1]), path[-1]
        if collection == "params" and name == "kernel":
            # conv kernels live in the ``conv`` submodule (torch ``<block>.conv.weight``); fc is a Linear
            out[path] = src(f"{module}.weight", CONV2D if len(leaf.shape) == 4 else LINEAR)
        elif (collection, name) in _LEAF_NAMES:
            suffix, transform = _LEAF_NAMES[(collection, name)]
            out[path] = src(f"{module}.{suffix}", transform)
        else:
            raise PortError(f"{KIND} port: no rule for Flax variable {'/'.join(path)}")
    return out


def read_state_dict(path: str):
    """A reader over the checkpoint at ``path``: a torch file (.pth/.pt/.bin/.ckpt) -> dict of numpy arrays; a
    .safetensors file or a directory holding one -> ``SafetensorsReader``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Inception-v3 weights {path!r} not found (pytorch-fid's {WEIGHTS_NAME}, or a "
                                ".safetensors with the same keys)")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return SafetensorsReader(path)
    if not path.endswith(_TORCH_SUFFIXES):
        raise PortError(f"{path}: unknown weights format; expected a torch state dict ({', '.join(_TORCH_SUFFIXES)})"
                        " or a .safetensors file")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading the torch checkpoint {path} needs PyTorch (the 'port' extra: pip install "
                          "'bifrost-jax[port]'), or convert it to .safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PortError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise PortError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
    return out


@functools.lru_cache(maxsize=4)
def _abstract(module: InceptionV3FID):
    # the architecture is fixed: trace it once per module configuration (~2 s of tracing on a small CPU)
    return abstract_params(module, jnp.zeros((1, 75, 75, 3), jnp.uint8), collections=("params", "batch_stats"))


def _ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked")  # BatchNorm's training counter: not used in inference


def load(path: str, *, dtype=jnp.float32, mesh=None, **kw):
    """(InceptionV3FID, {"params", "batch_stats"}) from pytorch-fid's weights at ``path``. ``dtype`` is the
    storage dtype (float32 is what FID needs); with a ``mesh`` tensors go straight to their shardings."""
    if kw:
        raise TypeError(f"{KIND} port: unexpected arguments {sorted(kw)}")
    module = InceptionV3FID(param_dtype=dtype)
    shapes, specs = _abstract(module)
    reader = read_state_dict(path)
    variables = load_mapped(reader, inception_key_map(shapes), shapes, dtype=dtype,
                            shardings=mesh_shardings(specs, mesh), what=f"{KIND} weights {path}",
                            ignore_unused=_ignored)
    return module, variables


def save(module, variables, path: str) -> None:
    """Write ``variables`` as a pytorch-fid state dict: ``path`` ending in .pth/.pt (torch.save) or .safetensors,
    else a directory holding ``model.safetensors``."""
    del module
    state = export_mapped(dict(variables), inception_key_map(variables))
    if path.endswith(_TORCH_SUFFIXES):
        import torch
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
        return
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "model.safetensors")
    write_safetensors(path, state)


PORTS = {KIND: (load, save)}
