"""PyTorch checkpoint directories <-> Flax parameter trees, by declarative key maps.

A family's port builds a ``KeyMap``: for every *expected* Flax parameter path, the PyTorch key(s) it comes from
and the layout ``Transform`` between them. Loading walks the expected paths, streams each tensor from the
safetensors file(s) (memory-mapped, one at a time) into the target dtype and sharding, and raises one
``PortError`` that lists every missing, unused and wrong-shape key. Nothing is ever initialised at random.
Saving inverts the same map, so what loads also exports.

Scanned layouts: a Flax leaf with a leading "layers" axis maps to a list of PyTorch keys (one per layer),
stacked on axis 0 after the per-layer transform (``Stack``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from bifrost_jax.parallel.rules import fit_sharding, tree_shardings

Path = tuple[str, ...]

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class PortError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and wrong-shape key."""


# ----------------------------------------------------------------------------------------------------------------
# safetensors, read without torch (bf16 through ml_dtypes), memory-mapped, one tensor at a time

class SafetensorsReader:
    """Reads one ``*.safetensors`` file, a sharded set with ``*.safetensors.index.json``, or a directory holding
    either (optionally restricted to files whose name starts with ``prefix``, e.g. "diffusion_pytorch_model")."""

    def __init__(self, path: str, prefix: str | None = None):
        self.path = path
        self._where: dict[str, str] = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        files = self._resolve_files(path, prefix)
        for f in files:
            header, start = _read_header(f)
            _check_extents(f, header, start)
            self._headers[f] = (header, start)
            for k in header:
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise PortError(f"{path}: tensor {k!r} appears in both {self._where[k]} and {f}")
                self._where[k] = f

    @staticmethod
    def _resolve_files(path: str, prefix: str | None) -> list[str]:
        if os.path.isfile(path):
            if path.endswith(".index.json"):
                index = read_json(path)
                if not isinstance(index.get("weight_map"), dict):
                    raise PortError(f"{path}: no 'weight_map' in this safetensors index")
                base = os.path.dirname(path)
                files = sorted({os.path.join(base, f) for f in index["weight_map"].values()})
                absent = [f for f in files if not os.path.isfile(f)]
                if absent:
                    raise PortError(f"{path}: the index names shard file(s) that do not exist: {absent}")
                return files
            return [path]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
        names = sorted(os.listdir(path))
        if prefix:
            names = [n for n in names if n.startswith(prefix)]
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            return SafetensorsReader._resolve_files(os.path.join(path, index[0]), None)
        files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no .safetensors file (or index) in {path!r}"
                                    + (f" starting with {prefix!r}" if prefix else ""))
        return files

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        header, _ = self._headers[self._where[key]]
        return tuple(header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        header, _ = self._headers[self._where[key]]
        return np.dtype(_ST_DTYPES[header[key]["dtype"]])

    def file_of(self, key: str) -> str:
        return self._where[key]

    def get(self, key: str) -> np.ndarray:
        f = self._where[key]
        header, start = self._headers[f]
        info = header[key]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        try:
            mm = np.memmap(f, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
            return np.frombuffer(mm, dtype=dtype, count=count).reshape(info["shape"])
        except (OSError, ValueError) as e:
            raise PortError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise PortError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(fh.fileno()).st_size
            if 8 + n > size:
                raise PortError(f"{path}: truncated safetensors file: the header claims {n} bytes, the file has "
                                f"{size} in all")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise PortError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PortError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise PortError(f"{path}: not a safetensors file (the header is not a JSON object)")
    return header, 8 + n


def _check_extents(path: str, header: dict, start: int) -> None:
    """Every tensor's dtype is known and its bytes lie inside the file: a truncated or damaged file is named with
    the tensors it cuts off, before anything is read."""
    size = os.path.getsize(path)
    problems, cut = [], []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {key!r}: malformed header entry {info!r}")
            continue
        if code not in _ST_DTYPES:
            problems.append(f"tensor {key!r}: unknown dtype {code!r} (known: {sorted(_ST_DTYPES)})")
            continue
        if end - begin != int(np.prod(shape)) * np.dtype(_ST_DTYPES[code]).itemsize or begin < 0:
            problems.append(f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} of {code}")
        elif start + end > size:
            cut.append(key)
    if cut:
        problems.append(f"truncated: the file has {size} bytes, {len(cut)} tensor(s) end past it: {sorted(cut)[:10]}"
                        + (" ..." if len(cut) > 10 else ""))
    if problems:
        raise PortError(f"{path}: damaged safetensors file:\n  - " + "\n  - ".join(problems))


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write a safetensors file (atomically: a temp file renamed into place)."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for k in sorted(tensors):
        a = np.array(tensors[k], order="C", copy=True)  # keeps 0-d arrays 0-d
        if a.dtype not in _NP_TO_ST:
            raise PortError(f"cannot write {k!r}: dtype {a.dtype} has no safetensors code")
        header[k] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for a in arrays:
            fh.write(a.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# layout transforms: PyTorch tensor <-> Flax leaf

@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change and its inverse. ``to_flax`` gets the PyTorch array, ``to_torch`` the Flax one."""
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # expected PyTorch shape from the Flax shape


IDENTITY = Transform("identity", lambda a: a, lambda a: a, lambda s: tuple(s))
LINEAR = Transform("linear (out,in)->(in,out)", lambda a: a.T, lambda a: a.T, lambda s: tuple(s[::-1]))
CONV2D = Transform("conv2d OIHW->HWIO", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1),
                   lambda s: (s[3], s[2], s[0], s[1]))


def reshape_transform(torch_shape: Sequence[int], flax_shape: Sequence[int], name="reshape") -> Transform:
    """A pure reshape (e.g. a (1,1,C) token to a (C,) leaf)."""
    ts, fs = tuple(torch_shape), tuple(flax_shape)
    return Transform(name, lambda a: a.reshape(fs), lambda a: a.reshape(ts), lambda s: ts)


def linear_from_flattened(torch_shape: Sequence[int]) -> Transform:
    """A Conv with kernel == stride (Conv3d patch embedding) seen as Linear: (out, *k) <-> (prod(k), out)."""
    ts = tuple(torch_shape)
    return Transform("conv-as-linear", lambda a: a.reshape(a.shape[0], -1).T, lambda a: a.T.reshape(ts),
                     lambda s: ts)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one Flax leaf comes from: one PyTorch key, or one per layer (stacked on axis 0)."""
    keys: tuple[str, ...]
    transform: Transform = IDENTITY
    stacked: bool = False


def src(key: str, transform: Transform = IDENTITY) -> Source:
    return Source((key,), transform, False)


KeyMap = dict[Path, Source]


def stacked_map(per_layer: Callable[[int], Mapping[Path, Source]], n: int) -> KeyMap:
    """Merge per-layer maps (each relative to the block) into one map of stacked Sources (scanned layout)."""
    maps = [per_layer(i) for i in range(n)]
    out: KeyMap = {}
    for path in maps[0]:
        parts = [m[path] for m in maps]
        out[path] = Source(tuple(p.keys[0] for p in parts), parts[0].transform, True)
    return out


def prefixed(prefix: Path, m: Mapping[Path, Source]) -> KeyMap:
    return {tuple(prefix) + tuple(k): v for k, v in m.items()}


def layers_map(flax_name: str, n: int, per_layer: Callable[[int], Mapping[Path, Source]], scan: bool) -> KeyMap:
    """Key map of n repeated blocks in either Flax layout (see ``nn.stack``)."""
    if scan:
        return prefixed((flax_name,), stacked_map(per_layer, n))
    out: KeyMap = {}
    for i in range(n):
        out.update(prefixed((f"{flax_name}_{i}",), per_layer(i)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# load / export

def flatten(tree) -> dict[Path, Any]:
    return traverse_util.flatten_dict(tree)


def unflatten(flat: Mapping[Path, Any]):
    return traverse_util.unflatten_dict(dict(flat))


def _fmt(path: Path) -> str:
    return "/".join(path)


def check_key_map(key_map: KeyMap, expected: Mapping[Path, Any], available: Mapping[str, tuple[int, ...]],
                  what: str, ignore_unused: Callable[[str], bool] | None = None) -> None:
    """Raise one PortError listing every missing, unexpected and wrong-shape key (and unmapped Flax leaves)."""
    problems = []
    unmapped = sorted(set(expected) - set(key_map))
    if unmapped:
        problems.append("Flax parameters with no PyTorch key in the port's map (a port bug): "
                        + ", ".join(_fmt(p) for p in unmapped))
    stale = sorted(set(key_map) - set(expected))
    if stale:
        problems.append("port map entries for parameters the model does not have (a port bug): "
                        + ", ".join(_fmt(p) for p in stale))
    missing, wrong = [], []
    used = set()
    for path, source in sorted(key_map.items()):
        if path not in expected:
            continue
        flax_shape = tuple(expected[path].shape)
        per_layer_shape = flax_shape[1:] if source.stacked else flax_shape
        if source.stacked and flax_shape[0] != len(source.keys):
            wrong.append(f"{_fmt(path)}: {flax_shape[0]} stacked layers but {len(source.keys)} keys")
        want = source.transform.torch_shape(per_layer_shape)
        for k in source.keys:
            used.add(k)
            if k not in available:
                missing.append(k)
            elif tuple(available[k]) != tuple(want):
                wrong.append(f"{k}: checkpoint shape {tuple(available[k])}, model expects {tuple(want)} "
                             f"(for {_fmt(path)})")
    unexpected = sorted(k for k in available if k not in used and not (ignore_unused and ignore_unused(k)))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if wrong:
        problems.append(f"wrong-shape keys ({len(wrong)}): " + "; ".join(wrong))
    if problems:
        raise PortError(f"{what}: checkpoint does not match the model:\n  - " + "\n  - ".join(problems))


def check_weight_dtypes(key_map: KeyMap, expected: Mapping[Path, Any], dtype_of: Callable[[str], np.dtype],
                        what: str, file_of: Callable[[str], str] | None = None) -> None:
    """Raise one PortError naming every checkpoint tensor (and its file) whose dtype cannot be the expected leaf:
    an integer or boolean tensor where a floating weight is expected is never cast silently (integer leaves, such
    as BatchNorm's ``num_batches_tracked`` counter, take integers)."""
    bad = []
    for path, source in sorted(key_map.items()):
        if path not in expected or not jnp.issubdtype(getattr(expected[path], "dtype", jnp.float32), jnp.floating):
            continue
        for k in source.keys:
            got = np.dtype(dtype_of(k))
            if got.kind in "iub":  # (bfloat16 and float8 are ml_dtypes kinds, not np.floating: weights all the same)
                where = f" in {file_of(k)}" if file_of else ""
                bad.append(f"{k}{where}: dtype {got}, but {_fmt(path)} is a floating-point weight")
    if bad:
        raise PortError(f"{what}: tensors that cannot be weights ({len(bad)}):\n  - " + "\n  - ".join(bad))


def load_mapped(reader, key_map: KeyMap, expected_params, *, dtype=jnp.float32, shardings=None, what: str = "",
                ignore_unused: Callable[[str], bool] | None = None):
    """Params tree with exactly the structure of ``expected_params`` (arrays or ShapeDtypeStructs), filled from
    ``reader`` (``SafetensorsReader`` or a dict of numpy arrays). ``shardings``: a matching tree of Shardings, or
    None for the default device. Tensors are converted one at a time."""
    expected = flatten(expected_params)
    if isinstance(reader, Mapping):
        available = {k: tuple(np.shape(v)) for k, v in reader.items()}
        get = lambda k: np.asarray(reader[k])  # noqa: E731
        dtype_of = lambda k: np.asarray(reader[k]).dtype  # noqa: E731
    else:
        available = {k: reader.shape(k) for k in reader.keys()}
        get, dtype_of = reader.get, reader.dtype
    what = what or getattr(reader, "path", "checkpoint")
    check_key_map(key_map, expected, available, what, ignore_unused)
    check_weight_dtypes(key_map, expected, dtype_of, what, file_of=getattr(reader, "file_of", None))
    flat_shardings = flatten(shardings) if shardings is not None else {}
    np_dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    out = {}
    for path, source in key_map.items():
        arrays = [source.transform.to_flax(get(k)) for k in source.keys]
        value = np.stack(arrays) if source.stacked else arrays[0]
        value = np.asarray(value, dtype=np_dtype)
        sharding = flat_shardings.get(path)
        if sharding is not None:
            out[path] = jax.device_put(value, fit_sharding(sharding, value.shape))
        else:
            out[path] = jnp.asarray(value)
    return unflatten(out)


def export_mapped(params, key_map: KeyMap, dtype=np.float32) -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy) for ``params`` under ``key_map``; every leaf must be mapped."""
    flat = flatten(params)
    unmapped = sorted(set(flat) - set(key_map))
    if unmapped:
        raise PortError("export: Flax parameters with no PyTorch key: " + ", ".join(_fmt(p) for p in unmapped))
    out: dict[str, np.ndarray] = {}
    for path, source in key_map.items():
        if path not in flat:
            raise PortError(f"export: parameter {_fmt(path)} is missing from the tree")
        value = np.asarray(jax.device_get(flat[path])).astype(dtype)
        parts = list(value) if source.stacked else [value]
        if len(parts) != len(source.keys):
            raise PortError(f"export: {_fmt(path)} has {len(parts)} layers, map has {len(source.keys)} keys")
        for k, part in zip(source.keys, parts):
            out[k] = np.array(source.transform.to_torch(part), order="C", copy=True)
    return out


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a diffusers/transformers directory needs a config.json)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise PortError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None


def write_json(path: str, obj: Mapping) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# module-level helpers shared by the family ports

def abstract_params(module, *init_args, collections: Sequence[str] = ("params",), **init_kwargs):
    """(shapes, logical_specs) of ``module``'s variables without allocating them: ShapeDtypeStructs and logical
    PartitionSpecs, for the collections named (``params``, and ``batch_stats`` where a model has BatchNorm)."""
    import flax.linen as nn

    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
    specs = nn.get_partition_spec(variables)
    shapes = nn.meta.unbox(variables)
    missing = [c for c in collections if c not in shapes]
    if missing:
        raise PortError(f"{type(module).__name__} has no variable collection(s) {missing}")
    return ({c: shapes[c] for c in collections}, {c: specs[c] for c in collections})


def mesh_shardings(logical_specs, mesh):
    """NamedShardings from logical specs under the project's rules (None without a mesh)."""
    if mesh is None:
        return None
    return tree_shardings(logical_specs, mesh)


def save_directory(path: str, config: Mapping, state_dict: Mapping[str, np.ndarray], weights_name: str,
                   dtype=np.float32, config_name: str = "config.json") -> None:
    """A from_pretrained-loadable directory: ``config.json`` + one safetensors file named ``weights_name``."""
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, weights_name),
                      {k: np.asarray(v, dtype=dtype) for k, v in state_dict.items()})
    write_json(os.path.join(path, config_name), config)
