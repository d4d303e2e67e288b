"""FID's Inception-v3 (models/inception.py, port kind "inception-fid") against an independent PyTorch reference
written here from torch.nn primitives after pytorch-fid's ``FIDInceptionV3`` (torchvision's Inception3 layout with
the FID pooling patches; torchvision itself is not used), with every weight and BatchNorm statistic random; port
errors; the resize against ``F.interpolate``; the sharded feature_fn; FID maths; ``bifrost eval reconstruction
--inception``.

Real parity with pytorch-fid's published weights (``pt_inception-2015-12-05-6726825d.pth``) needs the user's file;
these tests prove the architecture, the resize/normalisation and the key mapping on random weights."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
from conftest import max_rel_err
from PIL import Image

import bifrost_jax.port as port
from bifrost_jax.eval import reconstruction, run
from bifrost_jax.models.inception import preprocess, resize_bilinear
from bifrost_jax.port.base import PortError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "generate_tiny.py")


# ----------------------------------------------------------------------------------------------------------------
# the PyTorch reference (pytorch-fid's architecture, written out; ``fid=False`` is torchvision's plain pooling)

class RefConv(tnn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool(x, kind):
    if kind == "avg_fid":  # TensorFlow's avg_pool: padding not counted
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=1, padding=1)


class RefA(tnn.Module):
    def __init__(self, cin, pool_features, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = RefConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = RefConv(cin, 48, 1), RefConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = RefConv(cin, 64, 1)
        self.branch3x3dbl_2 = RefConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = RefConv(96, 96, 3, padding=1)
        self.branch_pool = RefConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_pool(x, self.pool))], 1)


class RefB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = RefConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = RefConv(cin, 64, 1)
        self.branch3x3dbl_2 = RefConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = RefConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class RefC(tnn.Module):
    def __init__(self, cin, c7, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = RefConv(cin, 192, 1)
        self.branch7x7_1 = RefConv(cin, c7, 1)
        self.branch7x7_2 = RefConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = RefConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = RefConv(cin, c7, 1)
        self.branch7x7dbl_2 = RefConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = RefConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = RefConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = RefConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = RefConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_pool(x, self.pool))], 1)


class RefD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = RefConv(cin, 192, 1), RefConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = RefConv(cin, 192, 1)
        self.branch7x7x3_2 = RefConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = RefConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = RefConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class RefE(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = RefConv(cin, 320, 1)
        self.branch3x3_1 = RefConv(cin, 384, 1)
        self.branch3x3_2a = RefConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = RefConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = RefConv(cin, 448, 1)
        self.branch3x3dbl_2 = RefConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = RefConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = RefConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = RefConv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(_pool(x, self.pool))], 1)


class RefInception(tnn.Module):
    """pytorch-fid's InceptionV3 (output block 3, resize_input and normalize_input on) over fid_inception_v3()."""

    def __init__(self, fid=True):
        super().__init__()
        a, e1, e2 = ("avg_fid", "avg_fid", "max") if fid else ("avg", "avg", "avg")
        self.Conv2d_1a_3x3 = RefConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = RefConv(32, 32, 3)
        self.Conv2d_2b_3x3 = RefConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = RefConv(64, 80, 1)
        self.Conv2d_4a_3x3 = RefConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = RefA(192, 32, a), RefA(256, 64, a), RefA(288, 64, a)
        self.Mixed_6a = RefB(288)
        self.Mixed_6b, self.Mixed_6c = RefC(768, 128, a), RefC(768, 160, a)
        self.Mixed_6d, self.Mixed_6e = RefC(768, 160, a), RefC(768, 192, a)
        self.Mixed_7a = RefD(768)
        self.Mixed_7b, self.Mixed_7c = RefE(1280, e1), RefE(2048, e2)
        self.fc = tnn.Linear(2048, 1008)

    def forward(self, x):  # x: (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomised(model, seed=0):
    """Every weight and BN statistic random (He-scaled convs keep activations O(1) through 94 conv layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, tnn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, tnn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, tnn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its state-dict .pth path, a .safetensors copy, ported module, variables)."""
    torch.manual_seed(0)
    model = _randomised(RefInception())
    d = tmp_path_factory.mktemp("inception")
    pth = str(d / "pt_inception-random.pth")
    torch.save(model.state_dict(), pth)
    module, variables = port.load("inception-fid", pth)
    return model, pth, d, module, variables


@pytest.fixture(scope="module")
def sharded_fn(reference):
    """``eval.reconstruction.inception_feature_fn`` (what ``bifrost eval reconstruction`` runs) on a (data 2,
    tensor 2) mesh: weights placed by the logical rules (conv output channels on "tensor"), the batch on "batch",
    3 images padded to 4. Tests reuse its one compiled shape, (4, 299, 299, 3)."""
    from bifrost_jax.parallel.mesh import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    return reconstruction.inception_feature_fn(reference[1], mesh=mesh)


def _images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _torch_features(model, images_uint8):
    x = torch.from_numpy(np.ascontiguousarray(images_uint8.transpose(0, 3, 1, 2))).float() / 255.0
    with torch.no_grad():
        return model(x).numpy()


def _set_pooling(model, fid: bool):
    """Switch the reference between pytorch-fid's pooling and torchvision's plain average pools (same weights)."""
    for m in model.modules():
        if isinstance(m, (RefA, RefC, RefE)):
            m.pool = ("max" if m is model.Mixed_7c else "avg_fid") if fid else "avg"


# ----------------------------------------------------------------------------------------------------------------
# parity

def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(3)
    for h, w in ((299, 299), (64, 512), (300, 298), (37, 1000), (1, 2)):
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
                             align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(resize_bilinear(jnp.asarray(x), (299, 299)))
        assert max_rel_err(got, want) <= 1e-6, (h, w)
    # antialiased or align_corners=True resizes are visibly different: the check above can fail
    x = rng.standard_normal((1, 3, 64, 512)).astype(np.float32)
    got = np.asarray(resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299))).transpose(0, 3, 1, 2)
    for kw in (dict(antialias=True), dict(align_corners=True)):
        other = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", **kw).numpy()
        assert max_rel_err(got, other) > 1e-2, kw
    # float input in [0, 1] is preprocessed exactly as uint8 / 255
    u8 = _images(9, (1, 40, 50, 3))
    np.testing.assert_allclose(np.asarray(preprocess(u8.astype(np.float32) / 255.0)), np.asarray(preprocess(u8)),
                               rtol=0, atol=1e-6)


def test_features_match_torch_reference(reference, sharded_fn):
    model, _, _, module, variables = reference
    batch = _images(0, (3, 299, 299, 3))
    want = _torch_features(model, batch)
    got = sharded_fn(batch)
    assert got.shape == (3, 2048) and got.dtype == np.float32
    assert (want > 0).mean() > 0.3 and want.std() > 1e-2  # a non-degenerate activation path
    err = max_rel_err(got, want)
    print(f"inception 299px features (sharded, padded batch) max_rel_err {err:.2e}")
    assert err <= 1e-4
    # the FID pooling patches matter: torchvision's pooling with the same weights is far off
    _set_pooling(model, fid=False)
    try:
        plain = _torch_features(model, batch[:1])
    finally:
        _set_pooling(model, fid=True)
    assert max_rel_err(got[:1], plain) > 1e-2
    # an image of another size (upsampled rows, downsampled columns) goes through the resize; unsharded, with logits
    odd = _images(1, (1, 180, 420, 3))
    feats, logits = jax.jit(lambda x: module.apply(variables, x, return_logits=True))(odd)
    want = _torch_features(model, odd)
    err = max_rel_err(np.asarray(feats), want)
    print(f"inception 180x420 features max_rel_err {err:.2e}")
    assert err <= 1e-4
    with torch.no_grad():
        want_logits = model.fc(torch.from_numpy(want)).numpy()
    err = max_rel_err(np.asarray(logits), want_logits)
    print(f"inception fc logits max_rel_err {err:.2e}")
    assert err <= 1e-4


def test_safetensors_export_round_trip(reference, tmp_path):
    model, _, _, module, variables = reference
    st = str(tmp_path / "inception.safetensors")
    port.save("inception-fid", module, variables, st)
    # the exported state dict is the torch one (num_batches_tracked aside) ...
    from bifrost_jax.port.base import SafetensorsReader
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    reader = SafetensorsReader(st)
    assert sorted(reader.keys()) == sorted(sd)
    for k, v in sd.items():
        assert np.array_equal(reader.get(k), v.numpy()), k
    # ... and loads back (without torch on the read path) to identical variables
    _, again = port.load("inception-fid", st)
    flat_a, flat_b = (jax.tree_util.tree_leaves_with_path(t) for t in (variables, again))
    assert len(flat_a) == len(flat_b) == 94 * 5 + 2  # 94 convs (kernel, BN scale/bias/mean/var), fc
    for (p, a), (q, b) in zip(flat_a, flat_b):
        assert p == q and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------------------------
# port errors

def test_port_errors_name_the_keys(reference, tmp_path):
    model = reference[0]
    sd = dict(model.state_dict())
    # a missing key, an unexpected key, a wrong shape (torchvision's 1000-class fc): all named in one error
    bad = dict(sd)
    del bad["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    bad["fc.weight"] = torch.zeros(1000, 2048)
    path = str(tmp_path / "bad.pth")
    torch.save(bad, path)
    with pytest.raises(PortError) as e:
        port.load("inception-fid", path)
    msg = str(e.value)
    assert "Mixed_6c.branch7x7dbl_4.bn.running_var" in msg and "missing" in msg
    assert "AuxLogits.fc.weight" in msg and "unexpected" in msg
    assert "fc.weight: checkpoint shape (1000, 2048)" in msg
    # the same through safetensors (no torch on the read path); num_batches_tracked may be absent
    from bifrost_jax.port.base import write_safetensors
    st = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    st.pop("Conv2d_1a_3x3.conv.weight")
    write_safetensors(str(tmp_path / "bad.safetensors"), st)
    with pytest.raises(PortError, match=r"Conv2d_1a_3x3\.conv\.weight"):
        port.load("inception-fid", str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        port.load("inception-fid", str(tmp_path / "nowhere.pth"))


# ----------------------------------------------------------------------------------------------------------------
# FID maths

def _scipy_fid(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance, written out with scipy's sqrtm."""
    from scipy.linalg import sqrtm
    covmean = np.real(sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sample_space_fid(x, y):
    """FID of two small feature sets (n << d) written in sample space: with centred A1, A2, S_i = A_i^T A_i / (n_i - 1)
    and the nonzero eigenvalues of S1 S2 are the squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)).
    (scipy's sqrtm of a 2048 x 2048 product takes a minute on this machine.)"""
    a1, a2 = x - x.mean(0), y - y.mean(0)
    trace_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a1 ** 2).sum() / (len(x) - 1) + (a2 ** 2).sum() / (len(y) - 1) - 2 * trace_sqrt)


def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(5)
    d = 48
    for n1, n2 in ((400, 300), (30, 20)):  # full-rank covariances, and rank-deficient ones (n < d)
        x = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d)) * 0.3
        y = rng.standard_normal((n2, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5
        mx, cx, my, cy = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
        want = _scipy_fid(mx, cx, my, cy)
        got = reconstruction.frechet_distance(mx, cx, my, cy)
        assert got == pytest.approx(want, rel=1e-6), (n1, n2)
        assert _sample_space_fid(x, y) == pytest.approx(got, rel=1e-8), (n1, n2)
        assert reconstruction.frechet_distance(mx, cx, mx, cx) == pytest.approx(0.0, abs=1e-6 * np.trace(cx))


def test_fid_of_a_set_with_itself_is_zero(sharded_fn):
    real, fake = reconstruction.FeatureStats(2048), reconstruction.FeatureStats(2048)
    for seed in (7, 8):  # two batches, streamed
        images = _images(seed, (3, 299, 299, 3))
        real.add(sharded_fn(images))
        fake.add(sharded_fn(255 - images))
    mu, cov = reconstruction.FeatureStats.mean_cov(real.packed(), 2048)
    assert reconstruction.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6 * np.trace(cov))
    assert reconstruction.frechet_distance(mu, cov, *reconstruction.FeatureStats.mean_cov(fake.packed(), 2048)) > 1.0


# ----------------------------------------------------------------------------------------------------------------
# bifrost eval reconstruction --inception

def test_eval_reconstruction_with_inception(reference, tmp_path, monkeypatch):
    """``bifrost eval reconstruction --inception``: the reported FID is the Frechet distance of the Inception
    features of the valid originals and reconstructions (recorded at the feature_fn boundary)."""
    pth = reference[1]
    rng = np.random.default_rng(2)
    data = tmp_path / "images"
    data.mkdir()
    for i in range(3):  # 3 images, batches of 2: the padded slot of the second batch must not count
        Image.fromarray(rng.integers(0, 256, (60 + 4 * i, 80, 3), dtype=np.uint8)).save(data / f"{i}.png")
    calls = []
    real_factory = reconstruction.inception_feature_fn

    def recording_factory(weights, **kw):
        fn = real_factory(weights, **kw)

        def features(images):
            out = fn(images)
            calls.append((np.array(images), np.array(out)))
            return out
        return features
    monkeypatch.setattr(reconstruction, "inception_feature_fn", recording_factory)
    out = tmp_path / "out"
    code = run.main(["reconstruction", "--config", TINY, "--random-weights", "--dataset", "folder", "--data-dir",
                     str(data), "--out",
                     str(out), "--batch-size", "2", "--inception", pth])
    assert code == 0
    result = json.loads((out / "reconstruction.json").read_text())
    assert result["num_images"] == 3 and result["inception"] == pth and result["fid"] is not None
    assert len(calls) == 4  # (originals, reconstructions) x 2 batches, in that order
    originals, recons = [calls[i][0] for i in (0, 2)], [calls[i][0] for i in (1, 3)]
    assert all(o.dtype == np.uint8 and o.shape == r.shape for o, r in zip(originals, recons))
    assert not np.array_equal(originals[0], recons[0])
    real = np.concatenate([calls[0][1], calls[2][1][:1]]).astype(np.float64)  # batch 2 has one valid image
    fake = np.concatenate([calls[1][1], calls[3][1][:1]]).astype(np.float64)
    assert result["fid"] == pytest.approx(_sample_space_fid(real, fake), rel=1e-6)
    assert result["fid"] > 0
    # a missing weights file fails before any work, naming the file
    with pytest.raises(SystemExit, match="nowhere.pth"):
        run.main(["reconstruction", "--config", TINY, "--random-weights", "--dataset", "folder", "--data-dir",
                  str(data), "--out",
                  str(out), "--inception", str(tmp_path / "nowhere.pth")])
