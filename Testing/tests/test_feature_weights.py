"""Feature-network weights through the weights manager (issue 21): `models features add` of a
MedicalNet-style .pth (converted with weights_only=True) or a .safetensors file into a fresh
MEDDIFFUSION_CACHE, listing, `evaluate --feature-weights NAME` (network from the record, sha256
checked before the load), a changed file, unknown names, refusals that leave nothing behind."""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from MedDiffusionLib.data.volumes import Volume, write_volume
from MedDiffusionLib.errors import UserError
from MedDiffusionLib.evaluation.features import (ResNet10Features, add_feature_weights, feature_weights_record,
                                                 feature_weights_records, feature_weights_root,
                                                 resolve_feature_weights)
from MedDiffusionLib.evaluation.sets import set_metrics
from MedDiffusionLib.evaluation_cli import add_parser as add_evaluate_parser
from MedDiffusionLib.feature_weights import add_parser as add_features_parser
from MedDiffusionLib.weights import WeightsError, sha256_file

GRID = (16, 16, 16)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh MedDiffusion cache per test (the session's is shared)."""
    root = tmp_path / "md-cache"
    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_net() -> ResNet10Features:
    torch.manual_seed(3)
    net = ResNet10Features(widths=(4, 8, 8, 8), stem_kernel=3).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def _medicalnet_pth(net: torch.nn.Module, path: Path) -> Path:
    """MedicalNet's layout: {"state_dict": OrderedDict("module." + name)}, a conv_seg head, no
    num_batches_tracked (older PyTorch)."""
    state = OrderedDict((f"module.{k}", v.clone()) for k, v in net.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    state["module.conv_seg.0.weight"] = torch.zeros(2, 8, 3, 3, 3)
    torch.save({"state_dict": state}, path)
    return path


def _sets(n_gen: int = 3, n_real: int = 4) -> tuple[list[Volume], list[Volume]]:
    rng = np.random.default_rng(0)
    make = lambda shift: Volume.from_network(  # noqa: E731
        (rng.normal(shift, 300, (16, 16, 16)).clip(-1000, 1000)).astype(np.float32), (2.0, 2.0, 2.0))
    return [make(100.0) for _ in range(n_gen)], [make(-200.0) for _ in range(n_real)]


def _parser() -> argparse.ArgumentParser:
    """`meddiffusion models features ...` and `meddiffusion evaluate` as cli.py wires them."""
    parser = argparse.ArgumentParser(prog="meddiffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    msub = sub.add_parser("models").add_subparsers(dest="models_command", required=True)
    add_features_parser(msub)
    add_evaluate_parser(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _leftovers(cache: Path) -> list[str]:
    root = cache / "features"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_add_medicalnet_pth_then_evaluate_by_name(cache, tmp_path, tiny_net, capsys):
    pth = _medicalnet_pth(tiny_net, tmp_path / "resnet_10.pth")
    assert _run(["models", "features", "add", "medicalnet-r10", "--network", "resnet10", "--weights", str(pth)]) == 0
    assert "converted from" in capsys.readouterr().out
    rec = feature_weights_record("medicalnet-r10")
    stored = cache / "features" / "medicalnet-r10" / "weights.safetensors"
    assert rec["path"] == str(stored) and rec["network"] == "resnet10" and rec["sha256"] == sha256_file(stored)
    assert rec["source_sha256"] == sha256_file(pth) and rec["source_format"] == "pytorch"
    assert _run(["models", "features"]) == 0 and _run(["models", "features", "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("medicalnet-r10") == 2 and "resnet10" in listed and "resnet_10.pth" in listed

    # by name (the network comes from the record) == the same weights converted by hand, by path
    gen, real = _sets()
    by_name = set_metrics(gen, real, metrics=(), feature_weights="medicalnet-r10", grid=GRID)
    hand = tmp_path / "r10.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(hand))
    by_path = set_metrics(gen, real, metrics=(), feature_network="resnet10", feature_weights=hand, grid=GRID)
    key = "fd_resnet10/generated vs real"
    assert list(by_name) == [key] and by_name[key] > 0
    assert by_name[key] == pytest.approx(by_path[key], rel=1e-6)
    ctx = by_name.rows[0].context
    assert ctx["weights_name"] == "medicalnet-r10" and ctx["weights_sha256"] == rec["sha256"]
    assert ctx["weights"] == str(stored) and ctx["features"] == 8
    assert by_path.rows[0].context["weights_sha256"] == sha256_file(hand)

    # the CLI: folders, --feature-weights NAME without --feature-network
    for name, vols in (("gen", gen), ("real", real)):
        (tmp_path / name).mkdir()
        for i, v in enumerate(vols):
            write_volume(v, tmp_path / name / f"{i}.nii.gz")
    out_json = tmp_path / "sets.json"
    assert _run(["evaluate", str(tmp_path / "gen"), str(tmp_path / "real"), "--no-frd", "--no-mmd", "--no-ms-ssim",
                 "--feature-weights", "medicalnet-r10", "--grid", *map(str, GRID), "--json", str(out_json)]) == 0
    assert "fd_resnet10" in capsys.readouterr().out
    assert "medicalnet-r10" in out_json.read_text() and rec["sha256"] in out_json.read_text()

    # another network asked for than the one recorded
    with pytest.raises(WeightsError) as exc:
        set_metrics(gen, real, metrics=(), feature_network="other-net", feature_weights="medicalnet-r10", grid=GRID)
    assert "were added for the network 'resnet10', not 'other-net'" in _one_line(exc)

    # the stored file changes: verify says so, every load refuses it before reading a volume
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    assert _run(["models", "features", "verify"]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    with pytest.raises(WeightsError) as exc:
        set_metrics(tmp_path / "no-such-folder", real, metrics=(), feature_weights="medicalnet-r10", grid=GRID)
    words = _one_line(exc)
    assert "changed since it was added" in words and "sha256" in words and "models features remove" in words
    with pytest.raises(WeightsError):
        _run(["evaluate", str(tmp_path / "gen"), str(tmp_path / "real"), "--no-frd", "--no-mmd", "--no-ms-ssim",
              "--feature-weights", "medicalnet-r10"])

    assert _run(["models", "features", "remove", "medicalnet-r10"]) == 0
    assert feature_weights_records() == [] and _leftovers(cache) == []
    with pytest.raises(WeightsError) as exc:
        set_metrics(gen, real, metrics=(), feature_weights="medicalnet-r10", grid=GRID)
    assert "no feature weights named 'medicalnet-r10' and no such file" in _one_line(exc)


def test_add_safetensors_is_copied_and_verified(cache, tmp_path, tiny_net, capsys):
    src = tmp_path / "r10.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in tiny_net.state_dict().items()}, str(src))
    rec = add_feature_weights("r10_copy", src)
    assert rec["sha256"] == rec["source_sha256"] == sha256_file(src) and rec["source_format"] == "safetensors"
    assert _run(["models", "features", "verify", "r10_copy"]) == 0
    assert "ok" in capsys.readouterr().out
    net, path, found = resolve_feature_weights("r10_copy")
    assert (net, path, found["name"]) == ("resnet10", Path(rec["path"]), "r10_copy")
    # a value that is not an added name is a path, given back as it is (load_feature_network reads it)
    assert resolve_feature_weights(str(src), "resnet10") == ("resnet10", src, None)
    assert resolve_feature_weights(tmp_path / "absent.safetensors") == (None, tmp_path / "absent.safetensors", None)


def test_add_refusals_leave_nothing(cache, tmp_path, tiny_net):
    good = _medicalnet_pth(tiny_net, tmp_path / "resnet_10.pth")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    (tmp_path / "weights.npy").write_bytes(b"\x00" * 20)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "opt": argparse.ArgumentParser}, tmp_path / "code.pth")
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    cases = [
        (dict(name="Bad Name", weights=good), "is not allowed"),
        (dict(name="r10.safetensors", weights=good), "is not allowed"),
        (dict(name="r10", weights=good, network="no-such-net"), "unknown feature network 'no-such-net'"),
        (dict(name="r10", weights=tmp_path / "absent.pth"), "not found"),
        (dict(name="r10", weights=tmp_path / "weights.npy"), "a .safetensors file or a PyTorch .pth/.pt"),
        (dict(name="r10", weights=tmp_path / "other.safetensors"), f"{tmp_path / 'other.safetensors'}: not ResNet-10"),
        (dict(name="r10", weights=tmp_path / "broken.safetensors"), "not a readable safetensors file"),
        (dict(name="r10", weights=tmp_path / "code.pth"), "loads with weights_only=True"),
        (dict(name="r10", weights=tmp_path / "nostate.pth"), "holds no state dict of tensors"),
    ]
    for kwargs, words in cases:
        with pytest.raises(UserError) as exc:
            add_feature_weights(**kwargs)
        assert words in _one_line(exc), kwargs
        assert _leftovers(cache) == [], kwargs
        assert ".add-" not in str(exc.value)  # messages name the user's file, not the temporary copy
    add_feature_weights("r10", good)
    with pytest.raises(WeightsError) as exc:
        add_feature_weights("r10", good)
    assert "added already" in _one_line(exc)
    assert _leftovers(cache) == ["r10"] and feature_weights_root() == cache / "features"
    with pytest.raises(WeightsError) as exc:
        _run(["models", "features", "remove", "r11"])
    assert "no feature weights named 'r11' (added: r10)" in _one_line(exc)


def test_evaluate_options_one_line(cache, tmp_path):
    for name in ("gen", "real"):
        (tmp_path / name).mkdir()
    gen, real = _sets(2, 2)
    with pytest.raises(UserError) as exc:  # a file still needs its network
        set_metrics(gen, real, feature_weights="x.safetensors")
    assert "without a feature network" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        _run(["evaluate", str(tmp_path / "gen"), str(tmp_path / "real"), "--feature-network", "resnet10"])
    assert "needs --feature-weights NAME" in _one_line(exc)
    with pytest.raises(UserError) as exc:  # an unknown name, before any volume is read
        _run(["evaluate", str(tmp_path / "gen"), str(tmp_path / "real"), "--no-frd", "--no-mmd", "--no-ms-ssim",
              "--feature-weights", "medicalnet-r10"])
    assert "no feature weights named 'medicalnet-r10'" in _one_line(exc)
    assert json.loads(json.dumps(feature_weights_records())) == []
