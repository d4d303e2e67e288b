"""Ahead-of-time compilation for device topologies: a step's per-device memory, FLOPs, the compiler's step time
and MFU, on a machine without those devices.

    bifrost aot --config configs/x.py --topology v5p:4x4x4 [--phase NAME] [--num-slices 2] [--config.k=v ...]

The generic core is :func:`compile_for_topology` (a function, its abstract arguments and a topology name ->
:class:`AotReport`); :func:`format_report` prints it and ``AotReport.fits`` is the HBM check. What can be compiled
by name is a registry (``targets.py``): ``register_aot_target(name, builder)`` with
``builder(config, mesh) -> (jitted_fn, abstract_args)`` (or an :class:`AotTarget`), the abstract arguments being
``jax.ShapeDtypeStruct``s carrying their shardings on ``mesh``. Built in:

* every training phase of ``bifrost_jax/train/registry.py`` (``--phase`` defaults to ``config.phase``): the real
  train step of ``train/state.py`` (optimizer, frozen weights, donated state, gradient accumulation) with the
  config's mesh and global batch: exactly what ``bifrost train`` would compile;
* ``flux-forward``: the FLUX transformer's loss forward + backward (``configs/flux_aot.py``), proving the path
  on the largest model without any training code;
* ``generate``: one MAR step and one FLUX + ControlNet Euler step of the pipeline (``generate.py``).
* ``generate-unet``: the same with a UNet decoder: one MAR step and one guided UNet + latent ControlNet
  sampling step (``generate_unet.py``; ``configs/full/sdxl_generate_aot.py``, ``sd15_generate_aot.py``).

Topologies (``topology.py``): TPU names as libtpu takes them ("v5p:2x2x1", "v5e:4x4", "v6e:8x8", "v4:4x4x4";
multislice with ``--num-slices``), which needs libtpu (``pip install -e '.[tpu]'``); "cpu" / "cpu:N" (this host's
CPU devices: the same code path, used by the tests) and "local" (``jax.devices()``: on a GPU host, the real GPU
compile). GPU names ("h100:8", "h100:4x8" = 4 hosts of 8; "h200:N", "a100:N") compile without a GPU through the
CUDA PJRT plugin (``pip install -e '.[gpu-aot]'``) and a ``GpuTargetConfigProto`` describing the GPU model,
shipped in ``bifrost_jax/data_files/gpu_target_configs/`` (``BIFROST_GPU_TARGET_CONFIG`` overrides): the real XLA
GPU pipeline down to PTX and ptxas, real per-GPU memory, no cost model (no XLA FLOPs or step time).

Counting caveat (``counting.py``): XLA's cost analysis (FLOPs and the TPU compiler's ``optimal_seconds``) counts
the body of a while loop once, whatever its trip count, so scanned layers and gradient-accumulation scans are
undercounted. The report therefore also counts the matmul/convolution FLOPs of the traced program with every scan
multiplied by its length, and scales the compiler's time by the ratio when that is larger.

Analytic cross-check: targets carry the analytic model FLOPs of ``bifrost_jax/models/flops.py`` (training phases:
``Phase.analytic_flops``; ``flux-forward``; ``generate``), printed beside the counted FLOPs with their ratio and a
per-module table; MFU uses them (model FLOPs: no remat recomputation, no elementwise work). Pallas splash-attention
kernels carry no cost estimate, so where they run the report marks the attention FLOPs as analytic-only and adds
their time at peak to the step time MFU is computed from (MFU is then an upper bound).
"""
from bifrost_jax.aot.cli import main
from bifrost_jax.aot.compile import (add_analytic, compile_for_topology, compile_jitted, corrected_optimal_seconds,
                                     make_topology_mesh)
from bifrost_jax.aot.counting import CountedFlops, count_flops
from bifrost_jax.aot.report import AotReport, AotTarget, format_report
from bifrost_jax.aot.targets import (AOT_TARGETS, compile_target, flux_forward_target, register_aot_target,
                                     resolve_target, train_step_target)
from bifrost_jax.aot.topology import (GIB, GPU_AOT_INSTALL_HINT, GPU_TARGET_CONFIG_DIR, GPU_TARGET_CONFIG_ENV,
                                      GPU_TARGET_CONFIGS, TPU_INSTALL_HINT, AotUnavailable, gpu_compile_only_notes,
                                      gpu_target_config_path, gpu_topology_devices, topology_devices)

__all__ = ["AOT_TARGETS", "AotReport", "AotTarget", "AotUnavailable", "CountedFlops", "GIB", "GPU_AOT_INSTALL_HINT",
           "GPU_TARGET_CONFIGS", "GPU_TARGET_CONFIG_DIR", "GPU_TARGET_CONFIG_ENV", "TPU_INSTALL_HINT", "add_analytic",
           "compile_for_topology", "compile_jitted", "compile_target", "corrected_optimal_seconds", "count_flops",
           "flux_forward_target", "format_report", "gpu_compile_only_notes", "gpu_target_config_path",
           "gpu_topology_devices", "main", "make_topology_mesh", "register_aot_target", "resolve_target",
           "topology_devices", "train_step_target"]
