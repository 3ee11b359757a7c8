"""Offline evaluation (``meddiffusion evaluate``): every number against an independent numpy/scipy
computation on known inputs, the set metrics' ranking on real chest CT, reports, the CLI handler
and one clear line for each bad input. Real data: Testing/data/lung2_crop.nii.gz and
lung1_64.nii.gz (see Testing/data/README.md); generated volumes from the bundled model."""
from __future__ import annotations

import argparse
import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage

from conftest import DATA
from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
from MedDiffusionLib.errors import UserError
from MedDiffusionLib.evaluation import (STANDARD_WINDOWS, EvaluationReport, ResNet10Features, frechet_distance,
                                        paired_metrics, register_feature_network, set_metrics)
from MedDiffusionLib.evaluation.radiomics import feature_matrix, frd_from_features, radiomics_extractor, radiomics_features
from MedDiffusionLib.evaluation.sets import ms_ssim_scales
from MedDiffusionLib.evaluation_cli import add_parser
from MedDiffusionLib.metrics import mmd_linear
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu


# -- independent reference implementations (numpy / scipy only) -----------------------------------
def _win(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)


def np_psnr(p, r, lo, hi):
    return 10 * math.log10(1.0 / np.mean((_win(p, lo, hi) - _win(r, lo, hi)) ** 2))


def np_ssim(p, r, lo, hi):
    """SSIM with scipy's Gaussian filter (sigma 1.5, truncated at radius 3: a 7-tap window), valid part."""
    x, y = _win(p, lo, hi), _win(r, lo, hi)

    def blur(a):
        return ndimage.gaussian_filter(a, sigma=1.5, truncate=2.0, mode="constant")[3:-3, 3:-3, 3:-3]

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))))


def np_mae(p, r, lo, hi):
    return float(np.mean(np.abs(np.clip(p.astype(np.float64), lo, hi) - np.clip(r.astype(np.float64), lo, hi))))


def np_dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def np_mmd(x, y):
    """Unbiased squared MMD, kernel k(a, b) = a.b / voxels, straight from the definition."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    n_vox = x.shape[1]
    k = lambda a, b: float(a @ b) / n_vox  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def scipy_frechet(mu1, s1, mu2, s2):
    with warnings.catch_warnings():  # small sets: singular covariances (sqrtm warns, the trace is still right)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# -- data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(DATA / "lung2_crop.nii.gz")  # 128x128x24, HU int16, LPS-flipped axes


@pytest.fixture(scope="module")
def pred(ct) -> Volume:
    """The CT with smooth and random errors: deterministic, partly outside every window."""
    rng = np.random.default_rng(3)
    arr = ct.array.astype(np.float32)
    arr = ndimage.uniform_filter(arr, 3) + rng.normal(0, 40, arr.shape).astype(np.float32) + 15
    return ct.with_array(arr.astype(np.float32))


def _crop(vol: Volume, x: int, y: int, z: int, size=(32, 32, 16), flip: bool = False) -> Volume:
    a = np.asarray(vol.array, np.float32)[x:x + size[0], y:y + size[1], z:z + size[2]]
    return Volume(np.ascontiguousarray(a[::-1] if flip else a), vol.affine.copy())


@pytest.fixture(scope="module")
def chest_sets(ct) -> dict[str, list[Volume]]:
    """Real chest CT crops, the same lightly augmented (left-right flip, 1-2 voxel shift), crops of
    two volumes of the bundled model (DDIM 10 steps, 64^3) and uniform noise; 32x32x16 each."""
    from MedDiffusionLib.jobs import run_job

    l1 = read_volume(DATA / "lung1_64.nii.gz")  # whole chest at the model's 64^3
    l2 = Volume(ct.array.astype(np.float32).reshape(64, 2, 64, 2, 24).mean((1, 3)), ct.affine @ np.diag([2, 2, 1, 1.]))
    res = run_job({"task": "generate", "params": {"sampler": "ddim", "steps": 10, "num_volumes": 2, "device": "cpu",
                                                  "mode": "reference"}})  # no kernel measuring: cheapest first run
    gen = [r.volume for r in res.results]
    assert gen[0].shape == (64, 64, 64)
    p1, p2 = [(8, 12, 16), (24, 20, 32), (8, 20, 40), (24, 12, 24)], [(8, 12, 4), (24, 20, 4)]
    rng = np.random.default_rng(1)
    return {"real": [_crop(l1, *p) for p in p1] + [_crop(l2, *p) for p in p2],
            "augmented": [_crop(l1, x + 2, y + 1, z + 1, flip=True) for x, y, z in p1]
                         + [_crop(l2, x + 2, y + 1, z + 1, flip=True) for x, y, z in p2],
            "generated": [_crop(g, *p) for g in gen for p in p1[:3]],
            "noise": [Volume(rng.uniform(-1000, 1000, (32, 32, 16)).astype(np.float32), l1.affine.copy())
                      for _ in range(6)]}


# -- paired ---------------------------------------------------------------------------------------
def test_paired_image_metrics_match_formulas(ct, pred, tmp_path):
    rep = paired_metrics(pred, ct)
    assert rep.kind == "paired" and not rep.context["resampled"]
    assert [r.where for r in rep.rows[::3]] == list(STANDARD_WINDOWS)
    assert STANDARD_WINDOWS["paper"] == (-1000, 1000)
    p, r = pred.array, ct.array
    for name, (lo, hi) in STANDARD_WINDOWS.items():
        assert rep[f"psnr/{name}"] == pytest.approx(np_psnr(p, r, lo, hi), rel=1e-4)
        assert rep[f"ssim/{name}"] == pytest.approx(np_ssim(p, r, lo, hi), rel=1e-4)
        assert rep[f"mae/{name}"] == pytest.approx(np_mae(p, r, lo, hi), rel=1e-6)
    # the windows differ, so the numbers must too (a window that is ignored would give equal rows)
    assert len({round(rep[f"psnr/{n}"], 3) for n in STANDARD_WINDOWS}) == 4
    own = paired_metrics(pred, ct, windows={"narrow": (-100, 100)})
    assert list(own) == ["psnr/narrow", "ssim/narrow", "mae/narrow"]
    assert own["mae/narrow"] == pytest.approx(np_mae(p, r, -100, 100), rel=1e-6)
    same = paired_metrics(ct, ct, windows={"paper": (-1000, 1000)})
    assert same["psnr/paper"] == math.inf and same["ssim/paper"] == pytest.approx(1.0) and same["mae/paper"] == 0


def test_report_json_and_csv(ct, pred, tmp_path):
    rep = paired_metrics(ct, ct, windows={"paper": (-1000, 1000), "lung": (-1350, 150)})
    rep.to_json(tmp_path / "r.json")
    rep.to_csv(tmp_path / "r.csv")

    def strict(name):
        raise ValueError(f"non-standard JSON constant {name}")

    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=strict)
    assert doc["kind"] == "paired" and doc["context"]["reference_grid"]["shape"] == [128, 128, 24]
    assert doc["rows"][0] == {"metric": "psnr", "where": "paper", "value": "inf", "unit": "dB",
                              "context": {"window": [-1000.0, 1000.0]}}
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["metric"], r["where"]) for r in rows] == [(r.metric, r.where) for r in rep.rows]
    assert rows[1]["value"] == "1.0" and rows[0]["value"] == "inf"
    assert json.loads(rows[0]["context"])["reference_grid"]["spacing"][2] == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary files left
    d = rep.to_dict()
    assert d["rows"][1]["value"] == 1.0 and isinstance(rep, EvaluationReport) and dict(rep)["mae/lung"] == 0.0


def test_label_maps_dice(ct, pred):
    ref_lab = ct.with_array(ct_labels_from_hu(ct.array).astype(np.int16))
    pl = ct_labels_from_hu(pred.array)
    pl[:5, :5, :3] = 7  # a label only the prediction has
    rep = paired_metrics(ct.with_array(pl.astype(np.float32)), ref_lab, labels=True)
    expect = {v: np_dice(pl == v, ref_lab.array == v) for v in (1, 2, 3, 7)}
    assert [r.where for r in rep.rows] == ["label 1", "label 2", "label 3", "label 7", "mean"]
    for v, d in expect.items():
        assert rep[f"dice/label {v}"] == pytest.approx(d, rel=1e-6)
    assert rep["dice/label 7"] == 0.0 and 0.5 < rep["dice/label 2"] < 1.0
    assert rep["dice/mean"] == pytest.approx(np.mean(list(expect.values())), rel=1e-6)
    assert rep.rows[0].context["reference_voxels"] == int((ref_lab.array == 1).sum())


def _ras_to_index(vol: Volume, ref: Volume) -> np.ndarray:
    """Continuous (i, j, k) indices in ``vol`` of every voxel centre of ``ref``, shape (3, *ref.shape)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ref.shape], indexing="ij"), 0).reshape(3, -1)
    ras = ref.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    return (np.linalg.inv(vol.affine) @ ras)[:3].reshape(3, *ref.shape)


def test_different_grids_refused_then_resampled(ct, pred):
    ref = Volume(ct.array[32:96, 32:96, 4:20].astype(np.float32), ct.affine @ np.array(
        [[1, 0, 0, 32], [0, 1, 0, 32], [0, 0, 1, 4], [0, 0, 0, 1.]]))
    shifted = np.array([[2, 0, 0, 10.7], [0, 2, 0, 9.2], [0, 0, 2, 2.5], [0, 0, 0, 1.]])
    coarse = Volume(pred.array[::2, ::2, ::2][:40, :40, :10].copy(), pred.affine @ shifted)
    with pytest.raises(UserError) as exc:
        paired_metrics(coarse, ref)
    msg = one_line(exc)
    assert "40x40x10 voxels, spacing 5.016x5.016x10 mm" in msg and "64x64x16 voxels, spacing 2.508x2.508x5 mm" in msg
    assert "--resample" in msg
    rep = paired_metrics(coarse, ref, resample=True, windows={"paper": (-1000, 1000)})
    assert rep.context["resampled"] and rep.context["interpolation"] == "linear"
    assert rep.context["prediction_grid"]["shape"] == [40, 40, 10]
    # independent resampling: scipy linear interpolation at the reference voxel centres, -1000 outside
    ijk = _ras_to_index(coarse, ref)
    inside = np.all([(ijk[a] >= -0.5) & (ijk[a] <= n - 0.5) for a, n in enumerate(coarse.shape)], axis=0)
    expect = ndimage.map_coordinates(coarse.array.astype(np.float64), ijk, order=1, mode="nearest")
    expect[~inside] = -1000.0
    assert 0.3 < inside.mean() < 1.0
    assert rep.context["coverage"] == pytest.approx(inside.mean(), abs=1e-6)
    assert rep["mae/paper"] == pytest.approx(np_mae(expect, ref.array, -1000, 1000), rel=1e-4)
    assert rep["psnr/paper"] == pytest.approx(np_psnr(expect, ref.array, -1000, 1000), rel=1e-4)
    # same shape and spacing, other origin: the message says where they differ
    moved = Volume(ref.array, ref.affine @ np.array([[1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]]))
    with pytest.raises(UserError) as exc:
        paired_metrics(moved, ref)
    assert "origin (" in one_line(exc)
    # label maps resample with nearest neighbour: the labels stay labels
    lab = Volume(ct_labels_from_hu(coarse.array).astype(np.int16), coarse.affine)
    ref_lab = ref.with_array(ct_labels_from_hu(ref.array).astype(np.int16))
    rl = paired_metrics(lab, ref_lab, labels=True, resample=True)
    near = ndimage.map_coordinates(lab.array.astype(np.float64), np.floor(ijk + 0.5), order=0, mode="nearest")
    near[~inside] = 0
    assert rl.context["interpolation"] == "nearest"
    for v in (1, 2, 3):
        assert rl[f"dice/label {v}"] == pytest.approx(np_dice(near == v, ref_lab.array == v), abs=2e-3)


@pytest.mark.parametrize("case", ["mr_reference", "nan", "window", "window_name", "labels_float", "labels_ct",
                                  "labels_empty", "small", "not_volume", "windows_with_labels", "no_overlap"])
def test_paired_bad_inputs_one_line(ct, case):
    mr = ct.with_array(np.clip((ct.array.astype(np.float32) + 1000) / 8, 0, 255).astype(np.uint8))
    f = ct.array.astype(np.float32)
    lab = ct.with_array(ct_labels_from_hu(f).astype(np.int16))
    tiny = Volume(np.linspace(-1000, 1000, 216).reshape(6, 6, 6), ct.affine)  # CT-like values, 6 voxels a side
    far = ct.affine.copy()
    far[:3, 3] += 5000  # 5 m away
    calls = {
        "mr_reference": (lambda: paired_metrics(ct, mr), "does not look like CT"),
        "nan": (lambda: paired_metrics(ct.with_array(np.where(f > 500, np.nan, f)), ct), "NaN"),
        "window": (lambda: paired_metrics(ct, ct, windows={"w": (100, -100)}), "LO must be below HI"),
        "window_name": (lambda: paired_metrics(ct, ct, windows={"a,b": (0, 1)}), "window name"),
        "labels_float": (lambda: paired_metrics(lab.with_array(lab.array + 0.5), lab, labels=True), "non-integer"),
        "labels_ct": (lambda: paired_metrics(ct, lab, labels=True), "negative values"),
        "labels_empty": (lambda: paired_metrics(lab, lab.with_array(np.zeros_like(lab.array)), labels=True), "no label"),
        "small": (lambda: paired_metrics(tiny, tiny), "7-voxel window"),
        "not_volume": (lambda: paired_metrics(f, ct), "must be a Volume"),
        "windows_with_labels": (lambda: paired_metrics(lab, lab, labels=True, windows={"a": (0, 1)}), "Dice"),
        "no_overlap": (lambda: paired_metrics(Volume(f, far), ct, resample=True), "does not overlap"),
    }
    call, words = calls[case]
    with pytest.raises(UserError) as exc:
        call()
    assert words in one_line(exc)


# -- set metrics: the numbers ---------------------------------------------------------------------
def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for n, f in ((200, 6), (5, 12)):  # full-rank, then rank-deficient covariances (5 samples, 12 features)
        a, b = rng.normal(size=(n, f)), rng.normal(0.3, 1.4, size=(n, f)) @ rng.normal(size=(f, f))
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_mmd_matches_numpy_for_equal_and_unequal_sets():
    from monai.metrics import MMDMetric

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 12, 10, 8)).astype(np.float32)
    y = (rng.uniform(0, 1, (5, 12, 10, 8)) ** 2).astype(np.float32)
    xt, yt = torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]
    assert mmd_linear(xt, yt) == pytest.approx(np_mmd(x, y), rel=1e-9)
    assert float(MMDMetric()(xt, yt[:4])) / x[0].size == pytest.approx(mmd_linear(xt, yt[:4]), rel=1e-5)
    # through set_metrics: equal sizes go through MONAI's MMDMetric, unequal through mmd_linear
    vols = lambda arr: [Volume(np.transpose(v * 2000 - 1000, (1, 2, 0)), np.eye(4)) for v in arr]  # noqa: E731
    real = vols(x)  # (i, j, k) = (10, 8, 12): the evaluation grid below, so nothing is resampled
    for gen, how in ((vols(y[:4]), "monai"), (vols(y), "mmd_linear")):
        rep = set_metrics(gen, real, metrics=("mmd",), grid=(10, 8, 12))
        assert rep.context["intensity"].startswith("HU window")
        g = np.stack([np.transpose(v.array, (2, 0, 1)) for v in gen])
        expect = np_mmd((np.transpose(np.stack([v.array for v in real]), (0, 3, 1, 2)) + 1000) / 2000, (g + 1000) / 2000)
        assert rep["mmd/generated vs real"] == pytest.approx(expect, rel=1e-5)
        assert how in rep.rows[0].context["implementation"]


def test_frd_equals_frd_score_compute_frd(chest_sets, tmp_path):
    from frd_score import compute_frd

    for name, vols in (("real", chest_sets["real"][:3]), ("gen", chest_sets["generated"][:3])):
        (tmp_path / name).mkdir()
        for i, v in enumerate(vols):
            write_volume(_crop(v, 8, 8, 4, size=(16, 16, 8)), tmp_path / name / f"v{i}.nii.gz")
    rep = set_metrics(tmp_path / "gen", tmp_path / "real", metrics=("frd",), frd_features="original")
    theirs = compute_frd([str(tmp_path / "real"), str(tmp_path / "gen")], frd_version="v1", num_workers=1,
                         image_types=["Original"])
    assert rep["frd/generated vs real"] == pytest.approx(float(theirs), rel=1e-9)
    ctx = rep.rows[0].context
    assert ctx["volumes"] == [3, 3] and ctx["features"] > 50 and ctx["mask"] == "whole volume"
    assert rep.context["real"] == {"source": str(tmp_path / "real"), "found": 3, "used": 3}


def test_set_metrics_rank_real_augmented_generated_noise(chest_sets):
    """real vs lightly augmented real < real vs generated < real vs noise, for FRD and MMD."""
    ex = radiomics_extractor("original")
    feats = {k: feature_matrix([radiomics_features(v, ex) for v in vols])[0] for k, vols in chest_sets.items()}
    frd = {k: frd_from_features(feats["real"], feats[k])[0] for k in ("augmented", "generated", "noise")}
    assert frd["augmented"] < frd["generated"] < frd["noise"], frd
    reps = {k: set_metrics(chest_sets[k], chest_sets["real"], metrics=("mmd", "ms_ssim"), grid=(32, 32, 16))
            for k in ("augmented", "generated", "noise")}
    mmd = {k: r["mmd/generated vs real"] for k, r in reps.items()}
    assert mmd["augmented"] < mmd["generated"] < mmd["noise"], mmd
    assert abs(mmd["generated"]) < 0.1 * mmd["noise"]
    # diversity: the real crops are alike in their anatomy, noise volumes are unlike each other
    div = {k: r["ms_ssim/generated"] for k, r in reps.items()}
    assert div["noise"] < div["generated"] and div["noise"] < reps["noise"]["ms_ssim/real"]
    assert reps["noise"].rows[1].context["pairs"] == 15 and reps["noise"].rows[1].context["scales"] == 2
    same = set_metrics(chest_sets["real"][:3], chest_sets["real"][:1] * 3, metrics=("ms_ssim",), grid=(32, 32, 32))
    assert same["ms_ssim/real"] == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_scales_fit_the_grid():
    assert [ms_ssim_scales(g) for g in ((64, 64, 64), (32, 32, 32), (32, 32, 16), (128, 128, 128))] == [4, 3, 2, 5]
    with pytest.raises(UserError) as exc:
        ms_ssim_scales((8, 8, 6))
    assert "too small for MS-SSIM" in one_line(exc)


def test_frd_paper_features_default(chest_sets):
    small = {k: [_crop(v, 10, 10, 5, size=(12, 12, 6)) for v in chest_sets[k][:2]] for k in ("generated", "real")}
    rep = set_metrics(small["generated"], small["real"], metrics=("frd",))
    ctx = rep.rows[0].context
    assert ctx["features_config"] == "paper" and ctx["features"] > 500  # LoG and wavelet images as well
    assert math.isfinite(rep["frd/generated vs real"])


def test_feature_network_frechet_with_random_safetensors_weights(chest_sets, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ResNet10Features().eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r10.safetensors"))
    gen, real = chest_sets["generated"][:3], chest_sets["real"][:4]
    rep = set_metrics(gen, real, metrics=(), feature_network="resnet10", feature_weights=tmp_path / "r10.safetensors",
                      grid=(32, 32, 32))
    assert list(rep) == ["fd_resnet10/generated vs real"] and rep.rows[0].context["features"] == 512
    # independently: the same volumes through the network by hand, Fréchet by scipy's sqrtm
    from MedDiffusionLib.evaluation.sets import to_grid

    def features(vols):
        x = torch.stack([(to_grid(v, (32, 32, 32)).clamp(-1000, 1000) + 1000) / 2000 for v in vols])[:, None]
        with torch.no_grad():
            return net(x).double().numpy()

    fg, fr = features(gen), features(real)
    expect = scipy_frechet(fr.mean(0), np.cov(fr, rowvar=False), fg.mean(0), np.cov(fg, rowvar=False))
    assert rep["fd_resnet10/generated vs real"] == pytest.approx(expect, rel=1e-4)
    assert rep["fd_resnet10/generated vs real"] > 0
    # a registered network of one's own
    register_feature_network("meanstd", lambda path: _MeanStd())
    own = set_metrics(gen, real, metrics=(), feature_network="meanstd", feature_weights=tmp_path / "r10.safetensors",
                      grid=(32, 32, 32))
    assert own["fd_meanstd/generated vs real"] > 0
    # weights: safetensors only, and they must fit
    torch.save(net.state_dict(), tmp_path / "r10.pt")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    for weights, name, words in ((tmp_path / "r10.pt", "resnet10", "safetensors files only"),
                                 (tmp_path / "other.safetensors", "resnet10", "not ResNet-10"),
                                 (tmp_path / "broken.safetensors", "resnet10", "not a readable safetensors"),
                                 (tmp_path / "none.safetensors", "resnet10", "not found"),
                                 (tmp_path / "r10.safetensors", "no-such-net", "unknown feature network")):
        with pytest.raises(UserError) as exc:
            set_metrics(gen, real, metrics=(), feature_network=name, feature_weights=weights)
        assert words in one_line(exc)


class _MeanStd(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.std(1), (flat > 0.5).float().mean(1)], 1)


@pytest.mark.parametrize("case", ["empty", "one", "missing", "file", "metric", "grid", "max_files", "weights_alone",
                                  "nan"])
def test_set_bad_inputs_one_line(chest_sets, tmp_path, case):
    real = chest_sets["real"][:2]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a volume")
    (tmp_path / "one").mkdir()
    write_volume(real[0], tmp_path / "one" / "a.nii.gz")
    bad = real[0].with_array(np.where(real[0].array > 0, np.nan, real[0].array))
    calls = {
        "empty": (lambda: set_metrics(tmp_path / "empty", real), "no volumes"),
        "one": (lambda: set_metrics(tmp_path / "one", real), "at least two"),
        "missing": (lambda: set_metrics(tmp_path / "nothing", real), "no such folder"),
        "file": (lambda: set_metrics(tmp_path / "one" / "a.nii.gz", real), "not a folder"),
        "metric": (lambda: set_metrics(real, real, metrics=("fid",)), "unknown set metric"),
        "grid": (lambda: set_metrics(real, real, grid=(4, 64, 64)), "between 8 and 256"),
        "max_files": (lambda: set_metrics(real, real, max_files=1000), "max_files"),
        "weights_alone": (lambda: set_metrics(real, real, feature_weights="x.safetensors"), "without a feature network"),
        "nan": (lambda: set_metrics([bad, real[1]], real, metrics=("mmd",)), "NaN"),
    }
    call, words = calls[case]
    with pytest.raises(UserError) as exc:
        call()
    assert words in one_line(exc)


def test_missing_optional_package_is_one_line():
    from MedDiffusionLib.evaluation.deps import require

    with pytest.raises(UserError) as exc:
        require("no_such_package_for_frd.sub", "FRD")
    assert "FRD needs the optional package no_such_package_for_frd (pip install 'meddiffusion[evaluate]')" in \
        one_line(exc)


def test_set_folder_bound_is_reported(chest_sets, tmp_path):
    for i, v in enumerate(chest_sets["real"][:3]):
        write_volume(v, tmp_path / f"v{i}.nrrd")
    rep = set_metrics(tmp_path, chest_sets["real"][:3], metrics=("mmd",), grid=(32, 32, 16), max_files=2)
    assert rep.context["generated"] == {"source": str(tmp_path), "found": 3, "used": 2}
    assert "first 2 of 3" in rep.context["warnings"][0]


# -- the command line -----------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meddiffusion")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_paired_and_sets(ct, pred, chest_sets, tmp_path, capsys):
    write_volume(ct, tmp_path / "ref.nii.gz")
    write_volume(pred, tmp_path / "pred.nrrd")
    args = _parse(["evaluate", str(tmp_path / "pred.nrrd"), str(tmp_path / "ref.nii.gz"), "--window", "paper", "-1000",
                   "1000", "--window", "soft", "-160", "240", "--csv", str(tmp_path / "m.csv"),
                   "--json", str(tmp_path / "m.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    expect = paired_metrics(read_volume(tmp_path / "pred.nrrd"), ct, windows={"paper": (-1000, 1000),
                                                                              "soft": (-160, 240)})
    assert f"{expect['psnr/soft']:.2f}" in out and "128x128x24 voxels" in out and "wrote" in out
    doc = json.loads((tmp_path / "m.json").read_text())
    assert [r["value"] for r in doc["rows"]] == pytest.approx([r.value for r in expect.rows], rel=1e-6)
    assert len(list(csv.DictReader((tmp_path / "m.csv").open()))) == 6
    with pytest.raises(UserError) as exc:  # refused before anything is computed
        args.func(args)
    assert "already exists" in one_line(exc)
    for name, vols in (("gen", chest_sets["generated"][:3]), ("real", chest_sets["real"][:3])):
        (tmp_path / name).mkdir()
        for i, v in enumerate(vols):
            write_volume(v, tmp_path / name / f"{i}.nii.gz")
    args = _parse(["evaluate", str(tmp_path / "gen"), str(tmp_path / "real"), "--no-frd", "--grid", "32", "32", "16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "3 generated volumes" in out and "ms_ssim  generated" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("frd", "mmd"))] == ["mmd"]


@pytest.mark.parametrize("argv,words", [
    (["{f}", "{d}"], "PRED is a file and REF a folder"),
    (["{d}", "{d}", "--labels"], "--labels applies to two files"),
    (["{f}", "{f}", "--no-frd"], "--no-frd applies to two folders"),
    (["{f}", "{f}", "--window", "w", "x", "1"], "must be numbers"),
    (["{d}", "{d}", "--no-frd", "--no-mmd", "--no-ms-ssim"], "every set metric is off"),
    (["{d}", "{d}", "--feature-network", "resnet10"], "needs --feature-weights"),
    (["{f}", "{f}", "--csv", "{d}"], "is a folder"),
    (["{f}", "{f}", "--json", "{d}/no/such.json"], "does not exist"),
    (["{f}", "{f}", "--csv", "{d}/a.csv", "--json", "{d}/a.csv"], "the same file"),
])
def test_cli_bad_arguments_one_line(tmp_path, argv, words):
    f = DATA / "lung2_crop.nii.gz"
    args = _parse(["evaluate", *[a.format(f=f, d=tmp_path) for a in argv]])
    with pytest.raises(UserError) as exc:
        args.func(args)
    assert words in one_line(exc)


def test_cli_missing_input(tmp_path):
    args = _parse(["evaluate", str(tmp_path / "none.nii.gz"), str(DATA / "lung2_crop.nii.gz")])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        args.func(args)
