"""Device topologies to compile for without the devices: TPU slices through libtpu, GPU models through the CUDA
PJRT plugin and a ``GpuTargetConfigProto``, and this host's CPU devices (see ``bifrost_jax/aot/__init__.py``)."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from typing import Optional

import jax

from bifrost_jax.parallel import devices as devspec


GIB = 1024 ** 3
TPU_INSTALL_HINT = "pip install -e '.[tpu]'"


class AotUnavailable(RuntimeError):
    """The requested topology cannot be compiled for on this machine (the message says why and what to do)."""


_GPU_NAMES = re.compile(r"^(gpu|cuda|rocm|nvidia|[ahbl]\d{2,3}|gh200|gb200|v100)", re.IGNORECASE)


def topology_devices(topology: str, *, num_slices: int = 1) -> list:
    """The devices of ``topology``: TPU topology devices (compile-only), this host's CPU devices ("cpu",
    "cpu:N") or ``jax.devices()`` ("local")."""
    name = topology.strip()
    if name == "local":
        return list(jax.devices())
    if name == "cpu" or name.startswith("cpu:"):
        cpus = jax.devices("cpu")
        n = int(name.split(":", 1)[1]) if ":" in name else len(cpus)
        if n > len(cpus):
            raise AotUnavailable(f"topology {name}: this host has {len(cpus)} CPU devices (raise it with "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
        return list(cpus[:n])
    if _GPU_NAMES.match(name):
        return gpu_topology_devices(name)
    devspec.parse_topology(name)  # a clear error for names that are not TPU topologies
    if importlib.util.find_spec("libtpu") is None:
        raise AotUnavailable(f"topology {name}: compiling for TPU needs libtpu, which is not installed here. "
                             f"Install it with: {TPU_INSTALL_HINT}")
    from jax.experimental import topologies

    # A topology description uses no chip, so several compile-only processes (or one beside a TPU job) may load
    # libtpu at once; without this libtpu refuses on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as e:  # libtpu rejects the name, or cannot start
        raise AotUnavailable(f"topology {name}: libtpu could not describe it: {e}") from e
    return list(desc.devices)


GPU_TARGET_CONFIG_ENV = "BIFROST_GPU_TARGET_CONFIG"
GPU_AOT_INSTALL_HINT = "pip install -e '.[gpu-aot]'"
# GPU models we ship a GpuTargetConfigProto for (bifrost_jax/data_files/gpu_target_configs/): the KIND of
# "KIND:N" -> file. Any other GPU: BIFROST_GPU_TARGET_CONFIG=path of a text proto for it.
GPU_TARGET_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
GPU_TARGET_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_files",
                                     "gpu_target_configs")


def gpu_target_config_path(kind: str) -> Optional[str]:
    """The ``GpuTargetConfigProto`` text file for GPU model ``kind`` ("h100", ...): ``$BIFROST_GPU_TARGET_CONFIG``
    when set (whatever the kind), else the one shipped for ``kind``, else None."""
    path = os.environ.get(GPU_TARGET_CONFIG_ENV, "")
    if path:
        return path
    name = GPU_TARGET_CONFIGS.get(kind.lower())
    return os.path.join(GPU_TARGET_CONFIG_DIR, name) if name else None


def _compile_only_platforms() -> None:
    """Keep the CUDA plugin from starting a GPU backend in this process. The plugin's initialisation checks the
    CUDA runtime libraries (absent on a GPU-less host: it then registers nothing, so no "cuda" topology either)
    unless the platforms JAX was asked for exclude CUDA; a topology needs no client. Only before JAX has
    started its backends, and only when nobody chose the platforms (JAX_PLATFORMS / jax_platforms)."""
    from jax._src import xla_bridge

    if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def gpu_topology_devices(name: str) -> list:
    """Compile-only devices of a GPU topology "KIND:N" or "KIND:HOSTSxN" (e.g. "h100:8", "h100:4x8"): no GPU needed,
    but the CUDA PJRT plugin (``pip install -e '.[gpu-aot]'``); else :class:`AotUnavailable` saying why.

    How (checked with jax / jaxlib / jax-cuda12-plugin 0.10.2 on a CPU-only host): JAX has no GPU topology of its
    own; ``jax.experimental.topologies.get_topology_desc(platform="cuda", topology_name=..., **options)`` hands
    the options to the plugin, whose topology factory (XLA ``PJRT_GpuDeviceTopology_Create``) reads two of them:
    ``target_config``, a ``stream_executor.GpuTargetConfigProto`` in text form describing the GPU model (without
    it the plugin asks the local GPUs: "No visible GPU devices"), and ``topology``,
    "PARTITIONS x HOSTS x GPUS_PER_HOST" (without it: "Cannot create topology without an explicit topology shape
    or without a client"; ``topology_name`` itself is ignored). The config is the file shipped for KIND
    (:data:`GPU_TARGET_CONFIGS`: H100 SXM 80 GB, H200 141 GB, A100 SXM 80 GB) or ``$BIFROST_GPU_TARGET_CONFIG``.
    XLA then compiles "deviceless": the whole GPU pipeline (SPMD partitioning, fusion, scheduling, LLVM -> PTX
    -> ptxas for sm_90a), so memory_analysis is the real per-GPU figure; cost_analysis is None (no FLOPs, no
    time estimate). What it cannot check without a GPU: cuDNN custom calls (fused attention) are lowered and
    scheduled but their cuDNN graphs are built only on a GPU (XLA's CuDnnWorkspaceRewriter needs a stream
    executor), so their workspace is counted as 0 bytes and cuDNN's own support checks run at load time.
    Multi-host names ("h100:4x8") give devices of 4 processes, compiled for from this one. On a GPU host
    ``--topology local`` compiles for its own GPUs."""
    m = re.fullmatch(r"([A-Za-z0-9]+)(?:[-_]\w+)?:(?:(\d+)x)?(\d+)", name)
    if not m:
        raise AotUnavailable(f"topology {name}: GPU topologies are written KIND:GPUS or KIND:HOSTSxGPUS_PER_HOST "
                             "(e.g. h100:8, h100:4x8)")
    kind, hosts, per_host = m.group(1).lower(), int(m.group(2) or 1), int(m.group(3))
    path = gpu_target_config_path(kind)
    if path is None:
        raise AotUnavailable(
            f"topology {name}: no GPU target config for {kind!r} (shipped: {', '.join(sorted(GPU_TARGET_CONFIGS))}). "
            f"Set {GPU_TARGET_CONFIG_ENV} to a stream_executor.GpuTargetConfigProto text file describing that GPU "
            "(XLA's xla/backends/gpu/target_config/specs/ has several; on a host with the GPU, "
            "--xla_dump_to writes one as *.gpu_target_config.pbtxt)")
    with open(path) as f:
        target_config = f.read()
    _compile_only_platforms()
    from jax.experimental import topologies

    shape = f"1x{hosts}x{per_host}"
    try:
        desc = topologies.get_topology_desc(platform="cuda", topology_name=shape, target_config=target_config,
                                            topology=shape)
    except NotImplementedError as e:  # no CUDA plugin registered
        raise AotUnavailable(
            f"topology {name}: JAX {jax.__version__} cannot compile for a GPU without the CUDA PJRT plugin, which "
            f"is not installed (or did not register) here: jax.experimental.topologies.get_topology_desc("
            f"platform='cuda') raised {type(e).__name__}: {e}. Install it with: {GPU_AOT_INSTALL_HINT} (no GPU "
            "needed). If it is installed, run with JAX_PLATFORMS=cpu: without a GPU the plugin registers only when "
            "CUDA is not among the requested platforms. On a GPU host use --topology local to compile for its "
            "GPUs with the config's mesh.") from e
    except Exception as e:  # the plugin rejects the config or the shape
        raise AotUnavailable(f"topology {name}: the CUDA PJRT plugin could not describe it from {path}: "
                             f"{type(e).__name__}: {e}") from e
    return list(desc.devices)


# JAX's GPU client preallocates this fraction of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)
# and allocates from that pool only: a program that fits the HBM may still not fit the default pool.
JAX_GPU_MEM_FRACTION_DEFAULT = 0.75


def gpu_compile_only_notes(report, hlo: str) -> list[str]:
    """What a compile for GPU topology devices (no GPU present) leaves out of the report."""
    notes = ["compiled for the GPU model without a GPU (deviceless XLA compile): XLA's GPU compiler gives no cost "
             "analysis, so no XLA FLOPs or step time; memory figures are the compiler's buffer assignment"]
    cudnn = len(re.findall(r'custom_call_target="__cudnn\$', hlo))
    if cudnn:
        notes.append(f"{cudnn} cuDNN custom call(s) (fused attention, convolutions): lowered and scheduled, but "
                     "without a GPU XLA neither builds their cuDNN graphs nor autotunes them, so their workspaces "
                     "(0 bytes here) are missing from the memory figures and cuDNN's own support checks run only "
                     "when the program is loaded on a GPU")
    if report.hbm_bytes and JAX_GPU_MEM_FRACTION_DEFAULT * report.hbm_bytes < report.total_bytes <= report.hbm_bytes:
        need = report.total_bytes / report.hbm_bytes
        notes.append(f"needs {100 * need:.0f}% of the GPU's memory; JAX's GPU client uses "
                     f"{100 * JAX_GPU_MEM_FRACTION_DEFAULT:.0f}% unless told otherwise: run it with "
                     f"XLA_PYTHON_CLIENT_MEM_FRACTION={min(0.99, math.ceil(need * 100 + 2) / 100):.2f} or more")
    return notes
