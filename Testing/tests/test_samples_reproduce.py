"""N samples with uncertainty (num_samples: samples, voxel-wise mean and std, each with provenance)
and `meddiffusion reproduce FILE` (re-run the recorded job, compare), on the chest CT crop with the
bundled sparse-view ControlNet, few sampler steps."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DATA, ROOT
from MedDiffusionLib.cli import main
from MedDiffusionLib.data.volumes import read_volume, write_volume
from MedDiffusionLib.errors import Cancelled, UserError
from MedDiffusionLib.jobs import ModelCache, resolve, run_job
from MedDiffusionLib.provenance import read_provenance, sidecar_path

CT = DATA / "lung2_crop.nii.gz"
SV = "chest-ct-mini-sparse-view"


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def fbp(tmp_path_factory, cache):
    """A cheap sparse-view FBP of the CT crop (8 views, 64 bins), as NRRD."""
    res = run_job({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64}, "inputs": {"input": str(CT)}},
                  cache=cache)
    path = tmp_path_factory.mktemp("fbp") / "fbp.nrrd"
    write_volume(res.results[0].volume, path, provenance=res.results[0].meta["provenance"])
    return path


def _spec(fbp, n, seed=0, steps=3):
    return {"task": "reconstruct", "controlnet": SV, "inputs": {"input": str(fbp)},
            "params": {"num_samples": n, "seed": seed, "sampler": "ddim", "steps": steps, "device": "cpu"}}


def test_samples_mean_std_and_their_provenance(fbp, cache):
    res = run_job(_spec(fbp, 5), cache=cache)
    names = [r.name for r in res.results]
    assert names == [f"sample_{i}.nrrd" for i in range(5)] + ["mean.nrrd", "std.nrrd"]
    samples = np.stack([r.volume.array for r in res.results[:5]]).astype(np.float64)
    assert all(not np.array_equal(samples[0], s) for s in samples[1:])  # different noise per sample
    np.testing.assert_allclose(res.results[5].volume.array, samples.mean(0), rtol=0, atol=1e-3)
    np.testing.assert_allclose(res.results[6].volume.array, samples.std(0, ddof=1), rtol=0, atol=1e-3)
    assert np.array_equal(res.results[6].volume.affine, res.results[0].volume.affine)
    for i, r in enumerate(res.results):
        prov = r.meta["provenance"]
        assert prov["synthetic"] is True and prov["result"] == r.name and prov["job"]["params"]["num_samples"] == 5
        assert prov["statistic"] == ("sample" if i < 5 else names[i][:-5])
        if i < 5:
            assert prov["sample_index"] == i and prov["sample_batch"] == 4
    # batches of 4 seeded seed + j: sample 4 is batch 1 (one sample, seed 4) = a one-sample run with seed 4
    one = run_job(_spec(fbp, 1, seed=4), cache=cache).results[0]
    assert one.name == "result_0.nrrd" and "statistic" not in one.meta["provenance"]
    np.testing.assert_allclose(one.volume.array, samples[4], rtol=0, atol=1e-3)


@pytest.mark.parametrize("n, task, words", [(0, "reconstruct", "must be positive"), (17, "reconstruct", "at most 16"),
                                            (2.5, "reconstruct", "must be an integer"),
                                            (2, "generate", "not a parameter of generate")])
def test_bad_sample_counts_are_refused_naming_the_field(fbp, n, task, words):
    spec = _spec(fbp, n) if task == "reconstruct" else {"task": "generate", "params": {"num_samples": n}}
    with pytest.raises(UserError, match=words) as err:
        resolve(spec)
    assert err.value.field == "num_samples"


def test_cancel_during_an_n_sample_run_returns_nothing(fbp, cache):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 8  # past the first batch's first steps

    with pytest.raises(Cancelled):
        run_job(_spec(fbp, 6, steps=4), cache=cache, cancel=cancel)


def test_ctrl_c_during_an_n_sample_cli_run_writes_nothing(fbp, tmp_path):
    out = tmp_path / "rec.nrrd"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "MedDiffusionLib.cli", "reconstruct", str(fbp), "--controlnet", SV,
                             "--num-samples", "8", "--sampler", "ddim", "--steps", "400", "--device", "cpu",
                             "--out", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "/400" not in seen and "/800" not in seen and time.monotonic() < deadline:  # the bar is moving
        seen += proc.stderr.read(1) or ""
        if proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + err
    assert "no output file was written" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_samples_and_reproduce_checks_each(fbp, tmp_path, capsys):
    out = tmp_path / "rec.nrrd"
    assert main(["reconstruct", str(fbp), "--controlnet", SV, "--num-samples", "3", "--sampler", "ddim", "--steps", "3",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rec_mean.nrrd", "rec_sample_0.nrrd", "rec_sample_1.nrrd", "rec_sample_2.nrrd", "rec_std.nrrd"]
    assert read_provenance(tmp_path / "rec_std.nrrd")["statistic"] == "std"
    capsys.readouterr()
    for name in ("rec_std.nrrd", "rec_sample_1.nrrd"):
        assert main(["reproduce", str(tmp_path / name), "--input", str(fbp), "--quiet"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("reproduced") and "max |difference| 0 HU" in text
    # the recorded input is required, and must be the same voxels
    assert main(["reproduce", str(tmp_path / "rec_mean.nrrd"), "--quiet"]) == 2
    assert "give it with --input FILE" in capsys.readouterr().err
    assert main(["reproduce", str(tmp_path / "rec_mean.nrrd"), "--input", str(CT), "--quiet"]) == 2
    assert "is not the volume this result was made from" in capsys.readouterr().err
    # a changed voxel is found
    vol = read_volume(tmp_path / "rec_sample_1.nrrd")
    arr = vol.array.copy()
    arr[3, 4, 5] += 50.0
    write_volume(vol.with_array(arr), tmp_path / "edited.nrrd", provenance=read_provenance(tmp_path / "rec_sample_1.nrrd"))
    assert main(["reproduce", str(tmp_path / "edited.nrrd"), "--input", str(fbp), "--quiet"]) == 1
    assert "DIFFERENT" in capsys.readouterr().out


def test_reproduce_generation_and_files_without_provenance(tmp_path, capsys):
    out = tmp_path / "g.nii.gz"
    assert main(["generate", "--sampler", "ddim", "--steps", "2", "--seed", "3", "--quiet", "--out", str(out)]) == 0
    kept = tmp_path / "again.nii.gz"
    capsys.readouterr()
    assert main(["reproduce", str(out), "--quiet", "--out", str(kept)]) == 0
    assert "reproduced" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(kept).array, read_volume(out).array)
    assert read_provenance(kept)["seed"] == 3
    # a result file -> a marked DICOM series, which reproduces too; an unmarked file is not exported
    from MedDiffusionLib.io.dicom import dicom_provenance, read_dicom_series

    assert main(["export", str(out), "--format", "dicom", "--out", str(tmp_path / "dcm")]) == 0
    series = read_dicom_series(tmp_path / "dcm")
    np.testing.assert_allclose(series.array, read_volume(out).array, atol=0.05)  # the int16 rescale's step
    np.testing.assert_allclose(series.affine, read_volume(out).affine, atol=1e-4)
    assert dicom_provenance(tmp_path / "dcm")["job"] == read_provenance(out)["job"]
    capsys.readouterr()
    assert main(["reproduce", str(tmp_path / "dcm"), "--quiet"]) == 0
    assert "max |difference| 0 HU" in capsys.readouterr().out
    assert main(["export", str(CT), "--format", "dicom", "--out", str(tmp_path / "real")]) == 2
    assert "no MedDiffusion provenance" in capsys.readouterr().err and not (tmp_path / "real").exists()
    # no provenance at all, and a NIfTI whose sidecar is gone (the descrip alone records no job)
    assert main(["reproduce", str(CT)]) == 2
    assert "no MedDiffusion provenance" in capsys.readouterr().err
    sidecar_path(out).unlink()
    assert main(["reproduce", str(out)]) == 2
    assert "records no job" in capsys.readouterr().err
