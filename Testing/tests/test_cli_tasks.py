"""End-to-end CLI on real CT (a crop of the pyradiomics lung2 case, bundled in Testing/data):
simulate-sparse-view, reconstruct and synthesize with the bundled demo ControlNets, and generate
with the bundled model."""
import numpy as np
import pytest

from conftest import DATA
from MedDiffusionLib.cli import main
from MedDiffusionLib.data.volumes import read_volume, write_volume
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu

CT = DATA / "lung2_crop.nii.gz"


def test_simulate_then_reconstruct(tmp_path, capsys):
    fbp = tmp_path / "fbp.nii.gz"
    assert main(["simulate-sparse-view", str(CT), "--views", "40", "--bins", "256", "--out", str(fbp)]) == 0
    ct, f = read_volume(CT), read_volume(fbp)
    assert f.shape == ct.shape and np.allclose(f.affine, ct.affine, atol=1e-5)
    body = ct.array > -300
    assert abs(np.median(f.array[body]) - np.median(ct.array[body])) < 80
    out = tmp_path / "recon.nii.gz"
    assert main(["reconstruct", str(fbp), "--controlnet", "chest-ct-mini-sparse-view", "--steps", "5",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    rec = read_volume(out)
    assert rec.shape == ct.shape and np.allclose(rec.affine, ct.affine, atol=1e-5)
    assert np.isfinite(rec.array).all() and -1100 < rec.array.min() and rec.array.max() < 3100


def test_synthesize_from_labels(tmp_path, capsys):
    ct = read_volume(CT)
    labels = tmp_path / "labels.nii.gz"
    write_volume(ct.with_array(ct_labels_from_hu(ct.array).astype(np.int16)), labels)
    out = tmp_path / "synth.nrrd"
    assert main(["synthesize", str(labels), "--controlnet", "chest-ct-mini-labels", "--steps", "5", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    syn = read_volume(out)
    assert syn.shape == ct.shape and np.allclose(syn.affine, ct.affine, atol=1e-4)
    bad = tmp_path / "bad.nii.gz"
    write_volume(ct.with_array(np.full(ct.shape, 7, np.int16)), bad)
    assert main(["synthesize", str(bad), "--controlnet", "chest-ct-mini-labels", "--out", str(tmp_path / "x.nii.gz"),
                 "--quiet"]) == 2
    assert "label values [7]" in capsys.readouterr().err


def test_reconstruct_rejects_nan_and_wrong_controlnet(tmp_path, capsys):
    ct = read_volume(CT)
    arr = ct.array.astype(np.float32)
    arr[0, 0, 0] = np.nan
    nan = tmp_path / "nan.nrrd"  # nibabel would store NaN as 0
    write_volume(ct.with_array(arr), nan)
    assert main(["reconstruct", str(nan), "--controlnet", "chest-ct-mini-sparse-view", "--out",
                 str(tmp_path / "r.nii.gz"), "--quiet"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["reconstruct", str(CT), "--controlnet", "chest-ct-mini-labels", "--out", str(tmp_path / "r.nii.gz"),
                 "--quiet"]) == 2
    assert "not sparse-view" in capsys.readouterr().err
    assert main(["reconstruct", str(CT), "--controlnet", "no-such-controlnet", "--out", str(tmp_path / "r.nii.gz")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_generate_with_bundled_model(tmp_path, sampler, capsys):
    out = tmp_path / "g.nii.gz"
    assert main(["generate", "--sampler", sampler, "--steps", "10", "--hu", "--device", "cpu", "--out", str(out),
                 "--quiet"]) == 0, capsys.readouterr().err
    vol = read_volume(out)
    assert vol.shape == (64, 64, 64) and vol.array.min() >= -1022 and vol.array.max() <= 525
