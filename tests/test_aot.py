"""Pod-scale infrastructure: `bifrost aot` (report, fit check, FLOP counting, CPU-topology compile, TPU compile when
libtpu is importable), the peak tables, multislice meshes and the launchers (bash -n and DRY_RUN command lines)."""
import importlib.util
import os
import re
import shlex
import subprocess
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bifrost_jax import aot
from bifrost_jax.configs import load_config_file
from bifrost_jax.parallel import devices as devspec
from bifrost_jax.parallel.multislice import mesh_from_config, split_mesh_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); "
                                  "TPU ahead-of-time compilation cannot run here")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


HAS_CUDA_PLUGIN = _has_module("jax_plugins.xla_cuda12") and _has_module("nvidia.cudnn")
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the CUDA PJRT plugin or cuDNN's library is not "
                                       "installed (pip install -e '.[gpu-aot]'; no GPU needed): deviceless GPU "
                                       "compilation cannot run here")


# ------------------------------------------------------------------------------------------------------------------
# Peak tables
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,name", [
    ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v4", "v4"),
    ("TPU7x", "tpu7x"), ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA B200", "b200"), ("NVIDIA GH200 480GB", "gh200")])
def test_chip_lookup_by_device_kind(kind, name):
    assert devspec.chip_for_device_kind(kind).name == name


def test_chip_lookup_by_topology_and_per_device_split():
    chip, grid = devspec.parse_topology("v5p:4x4x4")
    assert chip.name == "v5p" and grid == (4, 4, 4) and chip.peak_bf16_flops == 459e12
    assert devspec.chip_for_topology("v6e:8x8").name == "v6e"
    assert devspec.chip_for_device_kind("cpu") is None
    with pytest.raises(ValueError, match="unknown TPU topology"):
        devspec.parse_topology("v9z:2x2")
    # v4 topologies compiled without megacore list two devices per chip: peak and HBM halve
    two_per_chip = [SimpleNamespace(device_kind="TPU v4", coords=(x, 0, 0), slice_index=0) for x in (0, 0, 1, 1)]
    spec = devspec.per_device(two_per_chip)
    assert spec.devices_per_chip == 2 and spec.peak_bf16_flops == 275e12 / 2 and spec.hbm_bytes == 16 * 1024 ** 3
    assert devspec.mfu(2e12, 0.01, 400e12) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------------------
# Report, fit check, FLOP counting
# ------------------------------------------------------------------------------------------------------------------
def _report(**kw):
    base = dict(target="t", topology="v5p:2x2x1", platform="tpu", device_kind="TPU v5", num_devices=4,
                mesh_shape={"data": 1, "fsdp": 4, "tensor": 1}, argument_bytes=10 * 2 ** 30, output_bytes=9 * 2 ** 30,
                alias_bytes=8 * 2 ** 30, temp_bytes=5 * 2 ** 30, hbm_bytes=95 * 2 ** 30, xla_flops=1e12,
                xla_seconds=0.01, peak_flops=459e12)
    base.update(kw)
    return aot.AotReport(**base)


def test_report_total_fits_and_mfu():
    r = _report()
    assert r.total_bytes == 16 * 2 ** 30 and r.fits is True
    assert r.mfu == pytest.approx(1e12 / 0.01 / 459e12)
    text = aot.format_report(r)
    assert "FITS" in text and "16.000 GiB of 95.00 GiB HBM" in text and "MFU at the estimated time" in text
    big = _report(temp_bytes=200 * 2 ** 30)
    assert big.fits is False and "DOES NOT FIT" in aot.format_report(big)
    assert _report(hbm_bytes=None).fits is None
    oom = _report(error="out of memory: Ran out of memory in memory space hbm")
    assert oom.fits is False and "COMPILE FAILED" in aot.format_report(oom)
    # loops hide work from XLA's counts: the time estimate scales by counted / XLA FLOPs
    looped = _report(has_loops=True, counted_flops=4e12)
    assert looped.flops == 4e12 and looped.estimated_seconds == pytest.approx(0.04)
    assert looped.mfu == pytest.approx(r.mfu)


def _chain(x, ws):
    for i in range(ws.shape[0]):
        x = jnp.tanh(x @ ws[i])
    return x.sum()


def _scanned_chain(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()


def test_count_flops_multiplies_scans_where_xla_does_not():
    args = (jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((6, 128, 128), jnp.float32))
    analytic = 6 * 2 * 64 * 128 * 128
    # forward + two backward matmuls per layer; unrolled, JAX drops layer 0's unneeded input gradient, the scan
    # body computes it every iteration
    for fn, skipped in ((_chain, 1), (_scanned_chain, 0)):
        assert aot.count_flops(jax.make_jaxpr(fn)(*args)).flops == analytic
        grad_flops = aot.count_flops(jax.make_jaxpr(jax.grad(fn, argnums=1))(*args)).flops
        assert grad_flops == 3 * analytic - skipped * 2 * 64 * 128 * 128
    xla_unrolled = jax.jit(_chain).lower(*args).compile().cost_analysis()["flops"]
    xla_scanned = jax.jit(_scanned_chain).lower(*args).compile().cost_analysis()["flops"]
    assert xla_unrolled == pytest.approx(analytic, rel=0.05)
    assert xla_scanned < analytic / 3  # the caveat the counted FLOPs correct


def test_compile_for_cpu_topology_real():
    """The same code path as TPU on the 8 local CPU devices: per-device argument bytes are the shard sizes."""
    def fn(x, w):
        return jnp.tanh(x @ w)

    def shardings(mesh):
        return (NamedSharding(mesh, P(("data", "fsdp"), None)), NamedSharding(mesh, P(None, "tensor"))), \
            NamedSharding(mesh, P(("data", "fsdp"), "tensor"))

    args = (jax.ShapeDtypeStruct((256, 512), jnp.float32), jax.ShapeDtypeStruct((512, 1024), jnp.float32))
    r = aot.compile_for_topology(fn, args, "cpu:8", shardings=shardings,
                                 mesh_sizes={"data": 2, "fsdp": 2, "tensor": 2}, name="matmul")
    assert r.num_devices == 8 and r.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r.argument_bytes == (256 // 4) * 512 * 4 + 512 * (1024 // 2) * 4
    assert r.output_bytes == (256 // 4) * (1024 // 2) * 4
    assert r.counted_flops == pytest.approx(2 * 256 * 512 * 1024 / 8)
    assert r.xla_flops == pytest.approx(2 * 256 * 512 * 1024 / 8, rel=0.05)
    assert r.fits is None  # no HBM size for CPU devices


def test_cli_toy_train_step_on_cpu_topology(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc = aot.main(["--config", os.path.join(ROOT, "configs/toy.py"), "--topology", "cpu:8", "--hbm-gib", "1",
                   "--json", str(out_json), "--hlo", str(tmp_path / "step.hlo")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "train step of phase 'toy'" in text and "data=2, fsdp=2, tensor=2" in text and "FITS" in text
    assert out_json.exists() and '"fits": true' in out_json.read_text()
    hlo = (tmp_path / "step.hlo").read_text()   # the partitioned program: 8-way, with its collectives
    assert "ENTRY" in hlo and "num_partitions=8" in hlo and re.search(r"all-reduce|all-gather|reduce-scatter", hlo)
    # the same step cannot fit 1 KiB per device: exit 1 with the reason
    rc = aot.main(["--config", os.path.join(ROOT, "configs/toy.py"), "--topology", "cpu:8", "--hbm-gib", "1e-6"])
    captured = capsys.readouterr()
    assert rc == 1 and "DOES NOT FIT" in captured.out and "does not fit" in captured.err


def test_cli_refusals(capsys):
    cfg = os.path.join(ROOT, "configs/toy.py")
    if not _has_module("jax_plugins.xla_cuda12"):  # no CUDA PJRT plugin: JAX's own words and the install line
        assert aot.main(["--config", cfg, "--topology", "h100:8"]) == 2
        err = capsys.readouterr().err
        assert "cannot compile for a GPU without the CUDA PJRT plugin" in err
        assert "NotImplementedError: topology not implemented for cuda" in err
        assert aot.GPU_AOT_INSTALL_HINT in err and "--topology local" in err
    assert aot.main(["--config", cfg, "--topology", "b200:8"]) == 2  # a GPU we ship no target config for
    assert aot.GPU_TARGET_CONFIG_ENV in capsys.readouterr().err
    assert aot.main(["--config", cfg, "--topology", "cpu:8", "--phase", "nope"]) == 2
    assert "neither an aot target" in capsys.readouterr().err
    if not HAS_LIBTPU:
        assert aot.main(["--config", cfg, "--topology", "v5p:2x2x1"]) == 2
        assert "pip install -e '.[tpu]'" in capsys.readouterr().err


def _read_textproto(text: str) -> dict:
    """A protobuf text-format message as nested dicts of lists (every field may repeat): enough to check our GPU
    target configs without the stream_executor proto classes, which no installed package ships."""
    tokens = [t for t in re.findall(r'"(?:[^"\\]|\\.)*"|[{}:]|#[^\n]*|[^\s{}:"#]+', text) if not t.startswith("#")]
    pos = 0

    def scalar(t):
        if t.startswith('"'):
            return t[1:-1]
        for cast in (int, float):
            try:
                return cast(t)
            except ValueError:
                pass
        return t  # an enum value

    def message() -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != "}":
            name = tokens[pos]
            pos += 1 + (tokens[pos + 1] == ":")
            if tokens[pos] == "{":
                pos += 1
                value = message()
                assert tokens[pos] == "}", f"unbalanced braces after {name}"
            else:
                value = scalar(tokens[pos])
            pos += 1
            out.setdefault(name, []).append(value)
        return out

    parsed = message()
    assert pos == len(tokens), f"stray '}}' at token {pos}"
    return parsed


@pytest.mark.parametrize("kind,chip_name,major", [("h100", "h100-sxm", 9), ("h200", "h200", 9),
                                                  ("a100", "a100-80gb", 8)])
def test_gpu_target_configs_shipped_and_consistent(kind, chip_name, major, monkeypatch):
    """The GpuTargetConfigProto files ``--topology KIND:N`` uses parse, have the fields XLA needs, and agree with the
    peak table: device kind -> chip, memory, bandwidth and (Hopper) the bf16 tensor-core peak."""
    monkeypatch.delenv(aot.GPU_TARGET_CONFIG_ENV, raising=False)
    path = aot.gpu_target_config_path(kind)
    assert path and os.path.dirname(path) == aot.GPU_TARGET_CONFIG_DIR and os.path.isfile(path)
    with open(path) as f:
        cfg = _read_textproto(f.read())
    info = cfg["gpu_device_info"][0]
    assert cfg["platform_name"] == ["CUDA"] and cfg["dnn_version_info"][0]["major"] == [9]
    assert info["cuda_compute_capability"][0]["major"] == [major]
    for field in ("core_count", "threads_per_warp", "shared_memory_per_block_optin", "l2_cache_size",
                  "registers_per_core_limit", "clock_rate_ghz"):
        assert info[field][0] > 0, field
    name = cfg["device_description_str"][0]
    assert info["name"] == [name]
    chip = devspec.chip_for_device_kind(name)  # the name topology devices report as device_kind
    assert chip.name == chip_name
    # the datasheet's "80 GB" is decimal and below what the driver reports (79.1 GiB = 84.9e9 bytes on an H100)
    assert chip.hbm_bytes <= info["device_memory_size"][0] <= 1.1 * chip.hbm_bytes
    assert info["memory_bandwidth"][0] == pytest.approx(chip.hbm_bandwidth, rel=0.01)
    if "matrix_unit_description" in info:  # per-dtype tensor-core rates, keyed by xla.PrimitiveType (16 = BF16)
        rates = {r["key"][0]: r["value"][0] for r in info["matrix_unit_description"][0]["rate_infos"]}
        bf16 = rates[16]
        peak = (info["core_count"][0] * bf16["units_per_core"][0] * bf16["ops_per_clock"][0] * 2
                * bf16["clock_rate_ghz"][0] * 1e9)
        assert peak == pytest.approx(chip.peak_bf16_flops, rel=0.01)


def test_gpu_target_config_lookup_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(aot.GPU_TARGET_CONFIG_ENV, raising=False)
    assert aot.gpu_target_config_path("H100").endswith("h100_sxm.txtpb")
    assert aot.gpu_target_config_path("l4") is None
    with pytest.raises(aot.AotUnavailable, match=aot.GPU_TARGET_CONFIG_ENV):
        aot.gpu_topology_devices("l4:8")
    with pytest.raises(aot.AotUnavailable, match="KIND:GPUS"):
        aot.gpu_topology_devices("h100:eight")
    own = tmp_path / "l4.txtpb"
    own.write_text("platform_name: \"CUDA\"\n")
    monkeypatch.setenv(aot.GPU_TARGET_CONFIG_ENV, str(own))
    assert aot.gpu_target_config_path("l4") == aot.gpu_target_config_path("h100") == str(own)
    # setup.py ships every file (package data, the files are not a Python package)
    import ast
    import fnmatch
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_src = f.read()
    patterns = ast.literal_eval(re.search(r'package_data=\{"bifrost_jax": (\[.*?\])\}', setup_src).group(1))
    pkg = os.path.join(ROOT, "bifrost_jax")
    for name in aot.GPU_TARGET_CONFIGS.values():
        rel = os.path.relpath(os.path.join(aot.GPU_TARGET_CONFIG_DIR, name), pkg)
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_gpu_compile_only_notes():
    """What a deviceless GPU compile leaves out: the cost model, cuDNN workspaces (counted in the HLO), and JAX's
    default 75% GPU memory pool (a fraction to run with, only when the program fits the HBM but not the pool)."""
    hlo = ('%a = (bf16[1,8,256,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"\n'
           '%b = (bf16[8,64,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), '
           'custom_call_target="__cudnn$convForward"\n%c = f32[8]{0} custom-call(%z), custom_call_target="other"\n')
    gib = 2 ** 30
    r = _report(platform="gpu", hbm_bytes=80 * 10 ** 9, argument_bytes=11 * gib, output_bytes=9 * gib,
                alias_bytes=9 * gib, temp_bytes=52 * gib)       # 63 GiB of 74.5: 84.6%
    notes = aot.gpu_compile_only_notes(r, hlo)
    assert "no cost analysis" in notes[0] and "2 cuDNN custom call(s)" in notes[1]
    assert "needs 85% of the GPU's memory" in notes[2] and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.87" in notes[2]
    assert len(aot.gpu_compile_only_notes(_report(platform="gpu", hbm_bytes=80 * 10 ** 9), "")) == 1  # 16 GiB
    assert len(aot.gpu_compile_only_notes(_report(platform="gpu", hbm_bytes=8 * gib), "")) == 1  # no fit at all


def test_register_aot_target_hook():
    calls = []

    def builder(config, mesh):
        calls.append(dict(mesh.shape))
        spec = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
        return jax.jit(lambda x: x * 2), (spec,)

    aot.register_aot_target("test-double", builder)
    try:
        config = load_config_file(os.path.join(ROOT, "configs/toy.py"))
        r = aot.compile_target("test-double", config, "cpu:8")
        assert calls == [{"data": 2, "fsdp": 2, "tensor": 2}] and r.target == "test-double"
        assert r.argument_bytes == 8 * 4 * 4 // 2  # rows over fsdp=2, replicated over data and tensor
        with pytest.raises(ValueError, match="already registered"):
            aot.register_aot_target("test-double", lambda c, m: None)
    finally:
        aot.AOT_TARGETS.pop("test-double")


def test_cost_model_sentinel_correction():
    """libtpu's v6e cost model prices each ConcatBitcast custom call at -1 s: the count in the HLO is added back;
    a value still not positive (another unpriced op) gives no estimate rather than a wrong one; CPU's 0 stays
    silent."""
    hlo = ('%a = bf16[8]{0} custom-call(%x, %y), custom_call_target="ConcatBitcast"\n'
           '%b = bf16[8]{0} custom-call(%x, %y), custom_call_target="ConcatBitcast"\n'
           '%c = f32[8]{0} custom-call(%z), custom_call_target="tpu_custom_call"\n')
    sec, n, note = aot.corrected_optimal_seconds(-2 + 0.0125, hlo)
    assert n == 2 and sec == pytest.approx(0.0125) and "ConcatBitcast" in note and "12.500 ms" in note
    sec, n, note = aot.corrected_optimal_seconds(0.0125, "no custom calls")
    assert (sec, n, note) == (0.0125, 0, "")
    sec, n, note = aot.corrected_optimal_seconds(-3 + 0.5, hlo)     # a third sentinel we cannot attribute
    assert sec is None and n == 2 and "step time unknown" in note
    assert aot.corrected_optimal_seconds(0.0, "") == (None, 0, "")
    # a sentinel inside a conditional's branch is priced only if the analysis took that branch: added back only
    # as far as the total needs to turn positive (seen on v6e: the ViT's full/windowed-attention cond)
    cb = 'custom_call_target="ConcatBitcast"'
    module = ("%branch_a (p: f32[8]) -> f32[8] {\n  %x = f32[8] custom-call(%p), " + cb + "\n}\n\n"
              "%branch_b (p: f32[8]) -> f32[8] {\n  ROOT %y = f32[8] negate(%p)\n}\n\n"
              "ENTRY %main (p: f32[8], i: s32[]) -> f32[8] {\n"
              "  %a = f32[8] custom-call(%p), " + cb + "\n"
              "  %b = f32[8] custom-call(%a), " + cb + "\n"
              "  ROOT %c = f32[8] conditional(%i, %b, %b), branch_computations={%branch_a, %branch_b}\n}\n")
    sec, n, _ = aot.corrected_optimal_seconds(-2 + 0.02, module)        # the branch's sentinel was not priced
    assert n == 2 and sec == pytest.approx(0.02)
    sec, n, _ = aot.corrected_optimal_seconds(-3 + 0.02, module)        # it was
    assert n == 3 and sec == pytest.approx(0.02)


# ------------------------------------------------------------------------------------------------------------------
# GPU without a GPU (only where the CUDA PJRT plugin is installed: pip install -e '.[gpu-aot]')
# ------------------------------------------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"


@needs_cuda_plugin
def test_gpu_deviceless_compile_h100():
    """h100:8 and h100:2x8 give compile-only H100 devices; a sharded matmul compiles for them and the report holds the
    exact per-GPU buffer sizes, the H100's peak and HBM, and says that the GPU compiler has no cost model."""
    devices = aot.topology_devices("h100:8")
    assert len(devices) == 8 and {(d.platform, d.device_kind) for d in devices} == {("gpu", H100)}
    two_hosts = aot.topology_devices("h100:2x8")
    assert len(two_hosts) == 16 and sorted({d.process_index for d in two_hosts}) == [0, 1]

    x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)

    def shardings(mesh):
        rows = NamedSharding(mesh, P("fsdp", None))
        return (rows, NamedSharding(mesh, P())), rows

    r = aot.compile_for_topology(lambda x, w: jnp.tanh(x @ w), (x, w), "h100:8", shardings=shardings,
                                 mesh_sizes={"data": 1, "fsdp": 8, "tensor": 1}, name="matmul")
    assert (r.platform, r.device_kind, r.num_devices) == ("gpu", H100, 8)
    assert r.argument_bytes == 1024 * 512 * 2 // 8 + 512 * 256 * 2   # x's rows split 8 ways, w replicated
    assert r.output_bytes == 1024 * 256 * 2 // 8
    assert r.peak_flops == 989e12 and r.hbm_bytes == 80 * 10 ** 9 and r.fits is True
    assert r.counted_flops == 2 * 1024 * 512 * 256 / 8
    assert r.xla_flops is None and r.xla_seconds is None and r.mfu is None
    assert any("without a GPU" in n for n in r.notes)
    print(aot.format_report(r))


def _h100_attention_hlo(loss_or_fn, q, kv, grad: bool):
    mesh = aot.make_topology_mesh("h100:8", {"data": 1, "fsdp": 8, "tensor": 1})
    batch = NamedSharding(mesh, P("fsdp"))
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch) for s in (q, kv, kv)]
    fn = jax.grad(loss_or_fn, argnums=(0, 1, 2)) if grad else loss_or_fn
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


@needs_cuda_plugin
def test_gpu_deviceless_cudnn_attention_h100():
    """Our attention entry point on an H100 mesh: "auto" picks cuDNN (bf16, head_dim 64) and JAX's cuDNN flash
    lowering accepts our arguments: GQA (8 query / 2 kv heads), a causal AttentionMask (fwd + bwd), a dense
    (L, S) mask and an additive bias; XLA's GPU compiler keeps the cuDNN fused-attention custom calls."""
    from bifrost_jax.nn.attention import AttentionMask, choose_implementation, dot_product_attention

    b, l, h, kh, d = 8, 256, 8, 2, 64
    q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, l, kh, d), jnp.bfloat16)
    mesh = aot.make_topology_mesh("h100:8", {"data": 1, "fsdp": 8, "tensor": 1})
    with jax.set_mesh(mesh):
        assert choose_implementation(q, kv) == ("cudnn", "gpu")

    def causal_loss(q, k, v):
        out = dot_product_attention(q, k, v, mask=AttentionMask(causal=True))
        return jnp.sum(out.astype(jnp.float32) ** 2)

    compiled = _h100_attention_hlo(causal_loss, q, kv, grad=True)
    hlo = compiled.as_text()
    assert 'custom_call_target="__cudnn$fmhaSoftmax"' in hlo
    assert 'custom_call_target="__cudnn$fmhaSoftmaxBackward"' in hlo
    mem = compiled.memory_analysis()
    per_device = (l * h * d + 2 * l * kh * d) * 2          # one sequence of q, k, v in bf16
    assert mem.argument_size_in_bytes == per_device
    assert mem.output_size_in_bytes == per_device + 3 * 8  # dq, dk, dv + the output tuple's 3 pointers

    def masked(q, k, v):
        keep = jnp.tril(jnp.ones((l, l), bool))[None, None]   # (1, 1, L, S): a dense mask cuDNN reads as a bias
        bias = jnp.zeros((1, h, l, l), jnp.float32)
        return dot_product_attention(q, k, v, mask=keep, bias=bias)

    hlo = _h100_attention_hlo(masked, q, kv, grad=False).as_text()
    assert 'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"' in hlo


@needs_cuda_plugin
def test_gpu_deviceless_cudnn_attention_key_padding_mask():
    """A key-padding mask (B|1, 1, 1, S), as the Qwen vision tower's full_mask: JAX's cuDNN lowering refuses a mask
    or bias without the full (L, S) ("Bias must have same seq length as QKV"); nn/attention.py broadcasts it."""
    from bifrost_jax.nn.attention import dot_product_attention

    b, l, h, d = 8, 256, 8, 64
    q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16)

    def padded(q, k, v):
        valid = jnp.arange(l) < l - 16
        return dot_product_attention(q, k, v, mask=valid[None, None, None, :])

    hlo = _h100_attention_hlo(padded, q, q, grad=False).as_text()
    assert "__cudnn$fmha" in hlo


# ------------------------------------------------------------------------------------------------------------------
# TPU (only where libtpu is importable: pip install -e '.[tpu]')
# ------------------------------------------------------------------------------------------------------------------
@needs_libtpu
def test_tpu_compile_splash_attention_fwd_bwd():
    """Splash attention (auto on TPU: head_dim 128, L multiple of 128) compiles in shard_map for v5p:2x2x1."""
    from bifrost_jax.nn.attention import AttentionMask, dot_product_attention

    def loss(q, k, v, valid):
        mask = AttentionMask.padded_self_attention(valid, causal=True, full_suffix=128)
        return jnp.sum(dot_product_attention(q, k, v, mask=mask).astype(jnp.float32) ** 2)

    fn = jax.grad(loss, argnums=(0, 1, 2))
    qkv = jax.ShapeDtypeStruct((4, 512, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 512, 2, 128), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((4, 512), jnp.bool_)

    def shardings(mesh):
        s = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        return (s, s, s, NamedSharding(mesh, P(("data", "fsdp"), None))), (s, s, s)

    # conftest's global "highest" matmul precision would ask Mosaic for fp32 contractions of bf16 operands
    with jax.default_matmul_precision("default"):
        r = aot.compile_for_topology(fn, (qkv, kv, kv, valid), "v5p:2x2x1", shardings=shardings,
                                     mesh_sizes={"data": 1, "fsdp": 2, "tensor": 2}, name="splash")
    assert r.platform == "tpu" and r.fits is True and r.xla_seconds and r.mfu is not None
    assert any("Pallas kernel" in n for n in r.notes)  # the splash kernels are in the program
    print(aot.format_report(r))


@needs_libtpu
def test_tpu_v6e_step_time_with_cost_model_sentinel():
    """A softmax of an upcast bf16 input makes the v6e compiler prefetch input slices joined by a ConcatBitcast,
    which its cost model prices at -1 s. The report adds it back: the estimate is positive, and equals the estimate
    of the same program with a bf16 output (no ConcatBitcast) to within the cost of the wider store."""
    fn = lambda x: jax.nn.softmax(x.astype(jnp.float32), axis=-1)
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    shard = lambda mesh: ((NamedSharding(mesh, P("fsdp", None)),), NamedSharding(mesh, P("fsdp", None)))
    r = aot.compile_for_topology(fn, (x,), "v6e:2x2", shardings=shard, mesh_sizes={"fsdp": 4}, name="softmax")
    assert r.device_kind and "v6" in r.device_kind.lower()
    assert r.xla_seconds_raw < 0 and r.unknown_cost_ops >= 1, (r.xla_seconds_raw, r.unknown_cost_ops)
    assert r.xla_seconds == pytest.approx(r.xla_seconds_raw + r.unknown_cost_ops)
    # a lower bound of any estimate: the bytes the program must move at v6e's ~1.6 TB/s HBM bandwidth
    assert r.xla_seconds > 4096 * 4096 / 4 * (2 + 4) / 2e12
    assert r.mfu is not None
    r16 = aot.compile_for_topology(lambda x: fn(x).astype(jnp.bfloat16), (x,), "v6e:2x2", shardings=shard,
                                   mesh_sizes={"fsdp": 4}, name="softmax-bf16")
    assert r16.unknown_cost_ops == 0 and r16.xla_seconds_raw > 0
    assert 0.5 < r.xla_seconds / r16.xla_seconds < 3.0


@needs_libtpu
def test_tpu_toy_train_step_and_multislice(capsys):
    cfg = os.path.join(ROOT, "configs/toy.py")
    rc = aot.main(["--config", cfg, "--topology", "v5p:2x2x1"])
    text = capsys.readouterr().out
    assert rc == 0 and "TPU v5" in text and "FITS" in text
    rc = aot.main(["--config", cfg, "--topology", "v5p:2x2x1", "--num-slices", "2",
                   "--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    assert rc == 0


def _tiny_generate_config(mesh: dict, mllm_cfg: float = 2.0):
    """The model sections of configs/generate_tiny.py (that file imports the shapes vocabulary, i.e.
    tensorflow_datasets, which the libtpu venv lacks), as ``bifrost aot --phase generate`` reads them."""
    import ml_collections as mlc

    from bifrost_jax.train.phase_configs import section

    flux = dict(patch_size=1, in_channels=16, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, mrope_section=(2, 1, 1))
    kw = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True)
    c = mlc.ConfigDict(dict(mesh=mesh, t5=dict(max_length=16),
                            sample=dict(mllm_cfg=mllm_cfg, guidance=3.5, conditioning_scale=0.7)))
    c.mllm = section(dict(text=text, num_image_tokens=24, image_grid=(4, 6)), max_prompt_length=40, **kw)
    c.flux = section(dict(flux, num_layers=2, num_single_layers=2), **kw)
    c.controlnet = section({}, num_layers=1, num_single_layers=1, **dict(kw, scan_layers=False))
    return c


def test_generate_target_tiny_traces_on_cpu_mesh():
    """The ``generate`` target builds on a CPU mesh and its analytic FLOPs (all forward: the MAR branch rows with
    CFG-doubled rows, ControlNet without the precomputed condition, FLUX) equal the traced matmul FLOPs. (Traced,
    not compiled: the compile is the TPU test below; a CPU compile of it takes 20-100 s on this machine.)"""
    from bifrost_jax.aot.generate import generate_target
    from bifrost_jax.parallel.rules import axis_rules

    config = _tiny_generate_config({"data": 1, "fsdp": 2, "tensor": 2})
    mesh = aot.make_topology_mesh("cpu:4", dict(config.mesh))
    target = generate_target(config, mesh)
    with axis_rules(mesh):
        counted = aot.count_flops(target.fn.trace(*target.args).jaxpr).flops
    assert target.analytic is not None and counted == pytest.approx(target.analytic.total, rel=1e-6)
    assert "MAR decode step (4 rows x 24 slots" in target.description  # CFG doubles the rows (batch 2)
    assert aot.resolve_target("generate", config)[0] == "generate"


@needs_libtpu
def test_tpu_generate_target_tiny():
    """``bifrost aot --phase generate`` (one MAR decode step with CFG + one FLUX/ControlNet Euler step) on a tiny
    config compiles for v5p:2x2x1, fits, gets a compiler time estimate and MFU, and its analytic FLOPs equal the
    counted ones."""
    config = _tiny_generate_config({"data": 1, "fsdp": 2, "tensor": 2})
    # conftest's global "highest" matmul precision is a CPU parity setting; TPU compiles use the default
    with jax.default_matmul_precision("default"):
        r = aot.compile_target("generate", config, "v5p:2x2x1")
    print(aot.format_report(r))
    assert r.error is None and r.num_devices == 4 and r.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r.analytic_flops and r.counted_flops == pytest.approx(r.analytic_flops, rel=1e-6)
    assert r.platform == "tpu" and r.fits is True and r.xla_seconds and r.mfu is not None
    assert 0 < r.total_bytes < 2 ** 30 and "MAR decode step (4 rows x 24 slots" in r.notes[0]


# ------------------------------------------------------------------------------------------------------------------
# Multislice meshes
# ------------------------------------------------------------------------------------------------------------------
def test_hybrid_mesh_puts_slices_on_dcn_axis():
    devices = jax.devices()[:8]
    mesh = mesh_from_config({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}, devices,
                            granule_key=lambda d: d.id // 4)  # two fake slices of 4 devices
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].flat) == {0, 1, 2, 3} and set(ids[1].flat) == {4, 5, 6, 7}  # slice j = data block j
    plain = mesh_from_config({"data": 2, "fsdp": -1, "tensor": 1}, devices)
    assert dict(plain.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="unknown key"):
        split_mesh_config({"dcn_pipeline": 2})
    with pytest.raises(ValueError):
        mesh_from_config({"fsdp": -1, "dcn_data": 3}, devices, granule_key=lambda d: d.id // 4)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
SCRIPTS = ["tpu_pod.sh", "tpu_multislice.sh", "gpu_slurm.sbatch", "gpu_multinode.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], check=True)


def _dry(script, args, env, cwd):
    full = dict(os.environ, DRY_RUN="1", **env)
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", script)] + args, env=full, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")], res.stdout


def test_tpu_pod_dry_run(tmp_path):
    user = ["bifrost", "train", "--config", "configs/x.py", "--workdir", "gs://b/run 1"]
    cmds, _ = _dry("tpu_pod.sh", ["run", "--"] + user,
                   dict(TPU_NAME="pod", ZONE="us-east5-a", NUM_WORKERS="2", RUN_ID="r7", LOG_DIR=str(tmp_path)),
                   tmp_path)
    ssh = cmds[0]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "BIFROST_DISTRIBUTED=1" in remote and "logs/r7/worker-" in remote
    assert shlex.join(user[:-1]) in remote and "gs://b/run\\ 1" in remote  # the command survives quoting
    scps = [c for c in cmds if "scp" in c]
    assert [c[-1] for c in scps] == ["--worker=0", "--worker=1"]
    assert scps[1][-2] == f"{tmp_path}/r7/worker-1.log"


def test_tpu_multislice_dry_run(tmp_path):
    cmds, _ = _dry("tpu_multislice.sh", ["run", "--", "bifrost", "train", "--config", "c.py"],
                   dict(TPU_PREFIX="ms", NUM_SLICES="2", ZONE="z", NUM_WORKERS="1", RUN_ID="r",
                        COORDINATOR_IP="10.0.0.2", LOG_DIR=str(tmp_path)), tmp_path)
    ssh = sorted((c for c in cmds if "ssh" in c), key=lambda c: c[5])
    assert [c[5] for c in ssh] == ["ms-0", "ms-1"]
    for j, c in enumerate(ssh):
        remote = c[c.index("--command") + 1]
        assert f"MEGASCALE_SLICE_ID={j}" in remote and "MEGASCALE_NUM_SLICES=2" in remote
        assert "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080" in remote


def test_gpu_slurm_dry_run(tmp_path):
    cmds, out = _dry("gpu_slurm.sbatch", ["bifrost", "train", "--config", "c.py"],
                     dict(SLURM_NTASKS="4", SLURM_JOB_NODELIST="n[1-4]", COORDINATOR_HOST="n1"), tmp_path)
    assert "BIFROST_COORDINATOR=n1:12355 BIFROST_NUM_PROCESSES=4" in out
    srun = cmds[0]
    assert srun[0] == "srun" and "BIFROST_PROCESS_ID=$SLURM_PROCID" in srun[srun.index("-c") + 1]
    assert srun[-4:] == ["bifrost", "train", "--config", "c.py"]


def test_gpu_multinode_dry_run(tmp_path):
    cmds, _ = _dry("gpu_multinode.sh", ["--", "bifrost", "train"], dict(HOSTS="a b c", LOG_DIR=str(tmp_path)),
                   tmp_path)
    ssh = [c for c in cmds if c[0] == "ssh"]
    assert [c[1] for c in ssh] == ["a", "b", "c"]
    for i, c in enumerate(ssh):
        assert f"BIFROST_PROCESS_ID={i}" in c[2] and "BIFROST_COORDINATOR=a:12355" in c[2]
        assert "BIFROST_NUM_PROCESSES=3" in c[2] and c[2].endswith("bifrost train")
    _, out = _dry("gpu_multinode.sh", ["--", "true"], dict(NODE_RANK="1", NUM_NODES="2", COORDINATOR="a:1"),
                  tmp_path)
    assert "BIFROST_PROCESS_ID=1" in out


def test_text_decode_target_tiny_traces_on_cpu_mesh():
    """``bifrost aot --phase text-decode`` (configs/full/text_decode_aot.py with a tiny language model): one cached
    decode step builds on a CPU mesh, donates its cache, and its analytic FLOPs (projections + MLP of the new tokens,
    attention over the cache, the LM head) equal the traced matmul FLOPs."""
    import ml_collections as mlc

    from bifrost_jax.aot.text_decode import text_decode_target
    from bifrost_jax.configs import load_config_file
    from bifrost_jax.parallel.rules import axis_rules
    from bifrost_jax.train.phase_configs import TINY_MLLM_TEXT, TINY_VISION

    config = load_config_file(os.path.join(ROOT, "configs", "full", "text_decode_aot.py"),
                              ["decode.batch=4", "decode.cache_length=16", "mesh.tensor=2"])
    config.mllm.config.text = mlc.ConfigDict(TINY_MLLM_TEXT)
    config.vision.config = mlc.ConfigDict(TINY_VISION)
    mesh = aot.make_topology_mesh("cpu:4", dict(config.mesh))
    target = text_decode_target(config, mesh)
    with axis_rules(mesh):
        counted = aot.count_flops(target.fn.trace(*target.args).jaxpr).flops
    assert counted == pytest.approx(target.analytic.total, rel=1e-9)
    assert "4 rows against 16 cached tokens" in target.description
    assert aot.resolve_target(None, config)[0] == "text-decode"
