"""``meddiffusion generate-dataset`` (MedDiffusionLib.dataset / dataset_cli) with the bundled tiny
model: nnU-Net v2 layout, provenance marks, image+mask pairs, reruns, torchrun sharding, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from MedDiffusionLib import cli
from MedDiffusionLib import dataset as ds
from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
from MedDiffusionLib.model_cache import ModelCache
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu
from MedDiffusionLib.provenance import read_provenance

FAST = ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--quiet"]
ROWS = [{"id": "a", "seed": 11}, {"id": "b", "size": [64, 64, 64], "spacing": [4.8, 4.8, 4.3]}, {"class": 1}]
IDS = ["a", "b", "case_0003"]

def _manifest(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _gen(*argv) -> int:
    return cli.main(["generate-dataset", *map(str, argv)])


def same_voxels(a: Path, b: Path, ids) -> None:
    """The images of cases ``ids`` in two flat dataset folders have equal voxels."""
    for i in ids:
        assert np.array_equal(read_volume(a / f"{i}.nii.gz").array, read_volume(b / f"{i}.nii.gz").array), i


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 3-case images-only dataset, made once in this process."""
    tmp = tmp_path_factory.mktemp("single")
    man = _manifest(tmp / "cases.jsonl", ROWS)
    out = tmp / "Dataset501_Synth"
    assert _gen(man, "--out", out, "--seed", 5, "--threads", 1, *FAST) == 0
    return man, out


def test_images_only_flat_layout_rerun_and_redo(single, monkeypatch, capsys):
    man, out = single
    assert not (out / "dataset.json").exists()  # images only: flat (nnU-Net trains on pairs)
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["name"] == "Dataset501_Synth" and datalist["synthetic"] is True
    assert [t["image"] for t in datalist["training"]] == [f"{i}.nii.gz" for i in IDS]
    seeds = []
    for i in IDS:
        img = out / f"{i}.nii.gz"
        prov = read_provenance(img)
        assert prov and prov["task"] == "generate" and (out / f"{i}.json").is_file()
        seeds.append(prov.get("seed", json.loads((out / ".meddiffusion" / "done" / f"{i}.json").read_text())["seed"]))
    assert seeds == [11, 5 + 2, 5 + 3]  # the row's seed, else --seed + row number
    before = {i: read_volume(out / f"{i}.nii.gz").array for i in IDS}
    capsys.readouterr()
    # a rerun skips everything
    assert _gen(man, "--out", out, "--seed", 5, "--threads", 1, *FAST) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().err
    # a case without its image is redone, and only it, to the same voxels; a killed write's leftover goes
    (out / "b.nii.gz").unlink()
    (out / ".b.123-456-deadbeef.tmp.nii.gz").write_bytes(b"half")
    (out / ".meddiffusion" / "done" / ".b.123-456-deadbeef.tmp.json").write_bytes(b"{")  # a marker's, too
    (out / ".meddiffusion" / ".state.123-456-deadbeef.tmp.json").write_bytes(b"{")  # and the state file's
    mtime_a = (out / "a.nii.gz").stat().st_mtime_ns
    assert _gen(man, "--out", out, "--seed", 5, "--threads", 1, *FAST) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().err
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime_a
    assert np.array_equal(read_volume(out / "b.nii.gz").array, before["b"])
    assert not [p for p in out.rglob("*.tmp*")]


def _label_map(tmp: Path) -> Path:
    ct = read_volume(ROOT / "Testing" / "data" / "lung2_crop.nii.gz")
    affine = ct.affine.copy()
    affine[:3, :2] *= 2  # every other voxel in i and j: 64 x 64 x 24
    small = Volume(ct_labels_from_hu(ct.array[::2, ::2, :]).astype(np.int16), affine)
    path = tmp / "masks" / "p1.nii.gz"
    path.parent.mkdir()
    write_volume(small, path)
    return path


def test_pair_case_with_the_labels_controlnet(tmp_path, monkeypatch):
    lab = _label_map(tmp_path)
    lv = read_volume(lab)
    man = _manifest(tmp_path / "pairs.jsonl", [{"id": "p1", "labels": "masks/p1.nii.gz",
                                                "controlnet": "chest-ct-mini-labels",
                                                "size": list(lv.shape), "spacing": list(lv.spacing)}])
    out = tmp_path / "Dataset502_Pairs"
    assert _gen(man, "--out", out, "--threads", 1, *FAST) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["labels"]["background"] == 0 and sorted(doc["labels"].values()) == [0, 1, 2, 3, 4]
    assert json.loads((out / "datalist.json").read_text())["training"] == [
        {"image": "imagesTr/p1_0000.nii.gz", "label": "labelsTr/p1.nii.gz"}]
    img, seg = read_volume(out / "imagesTr" / "p1_0000.nii.gz"), read_volume(out / "labelsTr" / "p1.nii.gz")
    assert img.shape == seg.shape == lv.shape and np.allclose(img.affine, seg.affine, atol=1e-4)
    assert np.array_equal(seg.array, lv.array) and read_provenance(out / "labelsTr" / "p1.nii.gz") is None
    assert read_provenance(out / "imagesTr" / "p1_0000.nii.gz")["task"] == "synthesize"


def test_torchrun_two_ranks_match_one_process(single, tmp_path):
    man, one = single
    out = tmp_path / "Dataset501_Synth"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "MedDiffusionLib.cli",
           "generate-dataset", str(man), "--out", str(out), "--seed", "5", "--threads", "1", *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "datalist.json").read_text()) == json.loads((one / "datalist.json").read_text())
    same_voxels(one, out, IDS)


BAD = {
    "unknown class": ([{"id": "x"}, {"id": "y", "class": "no-such-class"}], "row 2 (id y)"),
    "illegal size": ([{"id": "x", "size": [64, 64, -3]}], "row 1 (id x)"),
    "missing label file": ([{"id": "x", "labels": "masks/none.nii.gz", "controlnet": "chest-ct-mini-labels"}],
                           "row 1 (id x)"),
    "label grid": ([{"id": "x", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels",
                     "size": [64, 64, 64]}], "row 1 (id x)"),
    "duplicate id": ([{"id": "x"}, {"id": "z"}, {"id": "X"}], "row 3 (id X)"),
    "too many rows": ([{}, {}, {}], "more than 2 rows"),
    "another dataset": ([{"id": "x"}], "holds another dataset"),
    "same request twice": ([{"id": "x", "seed": 3}, {"id": "y"}, {"id": "z"}], "row 3 (id z)"),  # --seed 0 + 3
    "colliding names": ([{"id": "x_label", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels"},
                         {"id": "x", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels", "seed": 9}],
                        "row 2 (id x)"),
    "nnU-Net without labels": ([{"id": "x"}], "nnU-Net v2 trains on image+mask pairs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    rows, words = BAD[case]
    _label_map(tmp_path)
    man = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    if case == "too many rows":
        monkeypatch.setattr(ds, "MAX_ROWS", 2)
    if case == "another dataset":
        (out / ".meddiffusion").mkdir(parents=True)
        (out / ".meddiffusion" / "state.json").write_text(json.dumps({"name": "other", "layout": "nnunet"}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    layout = {"colliding names": ["--layout", "flat"], "nnU-Net without labels": ["--layout", "nnunet"]}.get(case, [])
    assert _gen(man, "--out", out, *layout, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_failing_case_does_not_stop_the_others_and_ctrl_c_keeps_finished_cases(tmp_path, monkeypatch, capsys):
    lab = _label_map(tmp_path)
    bad = tmp_path / "masks" / "seven.nii.gz"
    lv = read_volume(lab)
    write_volume(lv.with_array(np.full(lv.shape, 7, np.int16)), bad)  # not a label value of the ControlNet
    man = _manifest(tmp_path / "m.jsonl", [{"id": "bad", "labels": "masks/seven.nii.gz",
                                            "controlnet": "chest-ct-mini-labels"}, {"id": "good"}])
    out = tmp_path / "flat"
    assert _gen(man, "--out", out, "--layout", "flat", "--threads", 1, *FAST) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped (already finished), 1 failed" in err and "failed: bad: " in err and "[7]" in err
    assert (out / "good.nii.gz").is_file() and not (out / "bad.nii.gz").exists()
    assert not (out / "datalist.json").exists() and "dataset files not written" in err
    # Ctrl-C after the first case: it stays finished, a rerun does the rest
    rows = [{"id": "c1"}, {"id": "c2"}]
    plan = ds.plan_dataset(rows, tmp_path / "ds", sampler="ddim", steps=2)

    def interrupt(case, status):
        raise KeyboardInterrupt

    cache, threads = ModelCache(), torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: 2 threads only contend
    try:
        with pytest.raises(KeyboardInterrupt):
            ds.run_dataset(plan, progress=False, on_case=interrupt, cache=cache)
        assert plan.finished(plan.cases[0]) and not plan.finished(plan.cases[1])
        assert not (tmp_path / "ds" / "datalist.json").exists()
        plan = ds.plan_dataset(rows, tmp_path / "ds", sampler="ddim", steps=2)
        summary = ds.run_dataset(plan, progress=False, cache=cache)
    finally:
        torch.set_num_threads(threads)
    assert (summary.done, summary.skipped, summary.failed) == (["c2"], ["c1"], [])
    assert len(json.loads((tmp_path / "ds" / "datalist.json").read_text())["training"]) == 2


def test_csv_manifest_reads_like_json_lines(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,class,size,spacing,seed\na,1,64x64x64,4.8x4.8x4.3,3\n,,,,\n")
    rows = ds.read_manifest(csv_path)
    assert rows[0] == {"id": "a", "class": 1, "size": [64, 64, 64], "spacing": [4.8, 4.8, 4.3], "seed": 3}
    plan = ds.plan_dataset(rows, tmp_path / "o", seed=10)
    assert [c.id for c in plan.cases] == ["a", "case_0002"] and plan.cases[1].spec.params["seed"] == 12
    assert not (tmp_path / "o").exists()


def test_batches_are_fixed_in_the_plan_and_reproducible(tmp_path, monkeypatch, capsys):
    """--batch 2: rows differing only in the seed run two at a time as one job with one seed per
    volume; the batches are the plan's, so two torchrun ranks write the same voxels, a rerun redoes
    a lost case inside its whole batch, and `reproduce` re-runs the recorded batch exactly."""
    from MedDiffusionLib.reproduce import reproduce

    rows = [{"id": f"c{i}", "seed": 20 + i} for i in range(5)]
    man = _manifest(tmp_path / "cases.jsonl", rows)
    out = tmp_path / "batched"
    common = ["--batch", "2", "--seed", "0", *FAST]
    assert _gen(man, "--out", out, "--threads", 1, *common) == 0
    plan = ds.plan_dataset(rows, out, sampler="ddim", steps=2, batch=2)
    assert [[c.id for c in members] for members, _ in plan.batches] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    prov = read_provenance(out / "c1.nii.gz")
    assert prov["seed"] == 21 and prov["result"] == "result_1.nii.gz"
    assert prov["job"]["params"]["seeds"] == [20, 21] and prov["job"]["params"]["num_volumes"] == 2
    assert read_provenance(out / "c4.nii.gz")["job"]["params"].get("seeds") is None  # a batch of one
    vols = {r["id"]: read_volume(out / f"{r['id']}.nii.gz").array for r in rows}
    assert not np.array_equal(vols["c0"], vols["c1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = reproduce(out / "c1.nii.gz")
    finally:
        torch.set_num_threads(threads)
    assert report.equal and report.max_abs == 0.0, report.text()
    # two ranks (batch i on rank i % 2) write the same voxels
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out", str(two), "--threads", "1",
                           *common],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_voxels(out, two, vols)
    # a lost case is redone inside its batch, to the same voxels; its batch mate is left alone
    (out / "c1.nii.gz").unlink()
    mtime = (out / "c0.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert _gen(man, "--out", out, "--threads", 1, *common) == 0
    assert "1 done, 4 skipped" in capsys.readouterr().err
    assert (out / "c0.nii.gz").stat().st_mtime_ns == mtime
    assert np.array_equal(read_volume(out / "c1.nii.gz").array, vols["c1"])
    # other batches would make other voxels: another dataset
    assert _gen(man, "--out", out, "--batch", "3", *FAST) == 2
    assert "holds another dataset" in capsys.readouterr().err


@pytest.mark.parametrize("params, words", [
    ({"num_volumes": 2, "seeds": [1, 2, 3]}, "3 seeds for num_volumes 2"),
    ({"seeds": "12"}, "list of whole numbers"), ({"seeds": [1, "x"]}, "seed"),
    ({"seeds": list(range(65))}, "at most 64"), ({"seed": 5, "seeds": [1, 2]}, "seed is the first of them")])
def test_bad_per_volume_seeds_are_refused(params, words):
    from MedDiffusionLib.errors import UserError
    from MedDiffusionLib.jobspec import resolve

    with pytest.raises(UserError, match=words) as exc:
        resolve({"task": "generate", "params": params})
    assert exc.value.field == "seeds"


def test_per_volume_seeds_set_the_count_and_the_first_seed():
    from MedDiffusionLib.jobspec import resolve

    p = resolve({"task": "generate", "params": {"seeds": [7, 3, 9]}}).params
    assert (p["num_volumes"], p["seed"], p["seeds"]) == (3, 7, [7, 3, 9])
