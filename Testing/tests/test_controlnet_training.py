"""ControlNet fine-tuning: 2-process DDP (gloo) equals one process with the same global batch;
resume after an interruption reproduces an uninterrupted run; loss falls on a tiny over-fit;
bad training data is reported by file name. Uses the tiny reference models as the base."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from MedDiffusionLib.data.volumes import Volume, write_volume
from MedDiffusionLib.io.checkpoints import load_model, save_model
from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu
from MedDiffusionLib.training.controlnet import ControlNetTrainer, DataError, TrainConfig, find_pairs

AE_ARGS = ("n_hiddens", "downsample", "image_channels", "norm_type", "num_groups", "embedding_dim", "n_codes", "patch_size")


@pytest.fixture(scope="module")
def base_dir(parity_ae, parity_bf, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    ae = PatchVolumeAE(**{k: parity_ae["config"][k] for k in AE_ARGS})
    ae.load_state_dict(parity_ae["state_dict"])
    net = BiFlowNet(**parity_bf["config"])
    net.load_state_dict(parity_bf["state_dict"])
    save_model(ae, d / "autoencoder")
    save_model(net, d / "biflownet")
    return d


def _phantom(seed):
    g = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:64, 0:64, 0:64] - 31.5
    hu = np.full((64, 64, 64), -1000.0)
    body = (xx ** 2 / 28 ** 2 + yy ** 2 / 22 ** 2) < 1
    hu[body] = 40
    for cx in (-12, 12):
        hu[body & (((xx - cx) ** 2 + yy ** 2) < 8 ** 2)] = -800
    hu += g.normal(0, 20, hu.shape)
    return hu.astype(np.float32)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    (d / "condition").mkdir()
    (d / "target").mkdir()
    for i in range(2):
        hu = _phantom(i)
        aff = np.diag([1.0, 1.0, 1.0, 1.0])
        write_volume(Volume(hu, aff), d / "target" / f"case{i}.nii.gz")
        write_volume(Volume(ct_labels_from_hu(hu).astype(np.int16), aff), d / "condition" / f"case{i}.nii.gz")
    return d


def _cfg(base_dir, out, **kw):
    base = dict(task="labels", out=str(out), weights=str(base_dir), class_index=1, spacing_xyz=[1.0, 1.0, 1.0],
                label_values=[0, 1, 2, 3], hu_window=[-1000.0, 500.0], steps=4, batch=2, lr=1e-3, seed=3,
                ckpt_every=100, val_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cli(args, nproc, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "MedDiffusionLib.cli", "train-controlnet", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "MedDiffusionLib.cli", "train-controlnet", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_process_gloo_equals_single_process(base_dir, pairs_dir, tmp_path):
    common = [str(pairs_dir), "--task", "labels", "--weights", str(base_dir), "--class", "1", "--spacing", "1", "1", "1",
              "--label-values", "0", "1", "2", "3", "--hu-window", "-1000", "500", "--steps", "3", "--batch", "4",
              "--lr", "1e-3", "--seed", "5"]
    _train_cli([*common, "--out", str(tmp_path / "one")], 1)
    _train_cli([*common, "--out", str(tmp_path / "two")], 2)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    worst = max((a["controlnet"][k] - b["controlnet"][k]).abs().max().item() for k in a["controlnet"])
    assert worst < 1e-5, worst
    moved = max((a["controlnet"][k] - load_model(base_dir / "biflownet").state_dict()[k]).abs().max().item()
                for k in ("time_mlp.1.weight", "downs.0.0.block1.proj.weight"))
    assert moved > 0  # training really changed the weights
    one = load_model(tmp_path / "one" / "controlnet", expect="controlnet")
    assert one.hint_channel == 4


def test_resume_reproduces_uninterrupted_run(base_dir, pairs_dir, tmp_path):
    pairs = find_pairs(pairs_dir)
    full = ControlNetTrainer(_cfg(base_dir, tmp_path / "full"), log=lambda m: None)
    full.fit(pairs, resume=False)
    part = ControlNetTrainer(_cfg(base_dir, tmp_path / "part", stop_after=2), log=lambda m: None)
    assert part.fit(pairs)["steps"] == 2
    assert not (tmp_path / "part" / "controlnet.safetensors").exists()
    resumed = ControlNetTrainer(_cfg(base_dir, tmp_path / "part"), log=lambda m: None)
    assert resumed.fit(pairs)["steps_run"] == 2
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for group in ("controlnet", "ema"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    assert a["history"]["loss"] == b["history"]["loss"]


def test_loss_falls_on_tiny_overfit(base_dir, pairs_dir, tmp_path):
    pairs = find_pairs(pairs_dir)[:1]
    trainer = ControlNetTrainer(_cfg(base_dir, tmp_path / "fit", steps=40, batch=2, lr=2e-3, ema_decay=0.0,
                                     val_every=40), log=lambda m: None)
    result = trainer.fit(pairs, val_pairs=pairs, resume=False)
    (s0, v0), (s1, v1) = result["validation"][0], result["validation"][-1]
    assert s0 == 0 and s1 == 40
    assert v1 < 0.9 * v0, result["validation"]


def test_bad_training_data_names_files(tmp_path, base_dir, pairs_dir):
    (tmp_path / "condition").mkdir()
    (tmp_path / "target").mkdir()
    write_volume(Volume(np.zeros((64, 64, 64), np.float32), np.eye(4)), tmp_path / "condition" / "a.nii.gz")
    write_volume(Volume(np.zeros((64, 64, 64), np.float32), np.eye(4)), tmp_path / "target" / "b.nii.gz")
    with pytest.raises(DataError, match="a.nii.gz.*b.nii.gz"):
        find_pairs(tmp_path)
    write_volume(Volume(np.zeros((64, 64, 32), np.float32), np.eye(4)), tmp_path / "target" / "a.nii.gz")
    (tmp_path / "target" / "b.nii.gz").unlink()
    trainer = ControlNetTrainer(_cfg(base_dir, tmp_path / "run"), log=lambda m: None)
    with pytest.raises(DataError, match="a.nii.gz.*does not match"):
        trainer.fit(find_pairs(tmp_path))
