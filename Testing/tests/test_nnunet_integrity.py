"""A dataset from ``meddiffusion generate-dataset`` passes nnU-Net v2's own integrity check
(``nnunetv2.experiment_planning.verify_dataset_integrity``, what ``nnUNetv2_plan_and_preprocess
--verify_dataset_integrity`` runs), provenance sidecars in imagesTr included; broken copies fail it.

nnunetv2 is installed by scripts/setup.sh (``--no-deps``, with only what this check imports)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from MedDiffusionLib import cli
from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu

IDS = ["p1", "p2", "p3"]
FAST = ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--threads", "1", "--quiet"]


def _label_maps(folder: Path) -> None:
    """Three different 64 x 64 x 24 label maps from the test CT: every other voxel in i and j, the
    same mirrored left-right, and the other half of the voxels (origin one voxel on)."""
    ct = read_volume(DATA / "lung2_crop.nii.gz")
    affine = ct.affine.copy()
    affine[:3, :2] *= 2
    shifted = affine.copy()
    shifted[:3, 3] += ct.affine[:3, 0] + ct.affine[:3, 1]
    even = ct_labels_from_hu(ct.array[::2, ::2, :]).astype(np.int16)
    odd = ct_labels_from_hu(ct.array[1::2, 1::2, :]).astype(np.int16)
    folder.mkdir()
    for name, arr, aff in [("p1", even, affine), ("p2", np.ascontiguousarray(even[::-1]), affine),
                           ("p3", odd, shifted)]:
        write_volume(Volume(arr, aff), folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """nnunetv2's check, imported with its three folders set (it reads them at import; unset, it
    only prints warnings) — and its spawned workers inherit them."""
    base = tmp_path_factory.mktemp("nnunet_env")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (base / var).mkdir()
        mp.setenv(var, str(base / var))
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        yield verify_dataset_integrity, get_filenames_of_train_images_and_targets
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nnunet_ds")
    _label_maps(tmp / "masks")
    out = tmp / "Dataset501_Synth"
    assert cli.main(["generate-dataset", "--from-labels", str(tmp / "masks"), "--controlnet", "chest-ct-mini-labels",
                     "--out", str(out), *FAST]) == 0
    return out


def test_generated_dataset_passes_nnunet_verify_dataset_integrity(dataset, nnunet, capfd):
    verify, list_cases = nnunet
    # the provenance sidecars are there, beside the images nnU-Net reads
    images = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    assert images == sorted([f"{i}_0000.nii.gz" for i in IDS] + [f"{i}_0000.json" for i in IDS])
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in IDS]
    # nnU-Net's own case listing (by file_ending) sees one image channel and one label per case
    cases = list_cases(str(dataset), json.loads((dataset / "dataset.json").read_text()))
    assert sorted(cases) == IDS
    for i in IDS:
        assert [Path(p).name for p in cases[i]["images"]] == [f"{i}_0000.nii.gz"]
        assert Path(cases[i]["label"]) == dataset / "labelsTr" / f"{i}.nii.gz"
    capfd.readouterr()
    verify(str(dataset), num_processes=1)  # raises (AssertionError, RuntimeError, ...) on a bad dataset
    out = capfd.readouterr().out  # workers print to the inherited descriptors: capfd sees them
    assert "verify_dataset_integrity Done" in out
    # not even its warnings (affine / origin / direction of image and label differ)
    assert "Error" not in out and "Warning" not in out and "WARNING" not in out, out


def _broken(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "Dataset502_Broken"
    shutil.copytree(dataset, copy)
    return copy


def test_nnunet_check_fails_without_a_label_file(dataset, nnunet, tmp_path):
    verify, _ = nnunet
    copy = _broken(dataset, tmp_path)
    (copy / "labelsTr" / "p2.nii.gz").unlink()
    with pytest.raises(AssertionError, match="p2"):
        verify(str(copy), num_processes=1)


def test_nnunet_check_fails_on_a_wrong_numTraining(dataset, nnunet, tmp_path):
    verify, _ = nnunet
    copy = _broken(dataset, tmp_path)
    doc = json.loads((copy / "dataset.json").read_text())
    doc["numTraining"] = 4
    (copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(AssertionError, match="expected number of training cases"):
        verify(str(copy), num_processes=1)


def test_nnunet_check_fails_on_a_label_value_dataset_json_lacks(dataset, nnunet, tmp_path, capfd):
    verify, _ = nnunet
    copy = _broken(dataset, tmp_path)
    seg = read_volume(copy / "labelsTr" / "p3.nii.gz")
    arr = seg.array.copy()
    arr[0, 0, 0] = max(json.loads((copy / "dataset.json").read_text())["labels"].values()) + 1
    write_volume(seg.with_array(arr), copy / "labelsTr" / "p3.nii.gz", overwrite=True)
    with pytest.raises(RuntimeError, match="unexpected labels"):
        verify(str(copy), num_processes=1)
    assert "p3.nii.gz" in capfd.readouterr().out
