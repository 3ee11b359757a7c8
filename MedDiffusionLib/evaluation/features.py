"""Fréchet distance on a 3-D feature network whose weights the user supplies (off by default).

A feature network is registered by name with a factory ``factory(weights: Path) -> torch.nn.Module``
(:func:`register_feature_network`). The module gets a batch of volumes ``(N, 1, D, H, W)``
(network order, float32, intensities normalised to [0, 1] as the set evaluation does, see
:mod:`.sets`) and returns features ``(N, F)``. Weights are read only from safetensors files
(:func:`load_safetensors`, never a pickle).

Built in: ``"resnet10"``, a MedicalNet-style 3-D ResNet-10 written here (BasicBlocks, one per
stage; stride 2 in the stem, the max-pool and stage 2, dilation 2 and 4 in stages 3 and 4; global
average pool of the last stage as the feature). Its parameter names follow the usual ResNet
layout (``conv1``, ``bn1``, ``layerN.0.conv1``, ``layerN.0.downsample.0``), so converted
MedicalNet ``resnet_10`` weights load (a ``module.`` prefix is dropped, the ``conv_seg``
segmentation head ignored); the stage widths are read from the weights. Each volume is z-scored
before the stem (MedicalNet's normalisation, over all voxels).

Weights kept by the weights manager (``meddiffusion models features add NAME --network resnet10
--weights FILE``, :func:`add_feature_weights`): the file is copied into
``MEDDIFFUSION_CACHE/features/NAME/weights.safetensors`` beside a ``FEATURES.json`` record (network
name, sha256, source file and its sha256), after a trial load into the network. Wherever weights
are asked for (:func:`load_feature_network`, ``set_metrics(feature_weights=...)``, ``meddiffusion
evaluate --feature-weights``) such a NAME may replace the file: its record supplies the network
and its sha256 is checked before every load (:func:`resolve_feature_weights`); a changed file or
an unknown name is one :class:`~MedDiffusionLib.weights.WeightsError` line. A value that is not a
registered name is a path (``./NAME`` forces a path).

MedicalNet's released ``resnet_10.pth`` (``{"state_dict": {"module.conv1.weight": ...}}``, plain
tensors) can be given to ``add`` as it is: it is read once with the safe unpickler
(``torch.load(weights_only=True)`` plus a few inert container types)
(:func:`MedDiffusionLib.io.safe_pickle.safe_load`, no code runs) and stored as safetensors. By hand::

    from safetensors.torch import save_file
    from MedDiffusionLib.io.safe_pickle import safe_load   # torch.load(..., weights_only=True)

    ckpt = safe_load("resnet_10.pth")
    state = ckpt.get("state_dict", ckpt)
    save_file({k: v.contiguous() for k, v in state.items()}, "resnet_10.safetensors")
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..paths import cache_root
from ..weights import WeightsError, sha256_file

FeatureFactory = Callable[[Path], nn.Module]
_REGISTRY: dict[str, FeatureFactory] = {}


# -- the distance ----------------------------------------------------------------------------------
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance of two Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (means
    ``(F,)``, covariances ``(F, F)``): ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))``.

    ``tr((s1 s2)^(1/2))`` is the sum of the square roots of the eigenvalues of the symmetric
    ``s1^(1/2) s2 s1^(1/2)`` (similar to ``s1 s2``), computed with ``eigh``: stable for the
    singular covariances of small sets, no complex round-off. Never below 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"Fréchet distance needs means (F,) and covariances (F, F) of one F, got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (unbiased, as ``np.cov``) of features ``(N, F)``, N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need features (N, F) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


# -- the registry -----------------------------------------------------------------------------------
def register_feature_network(name: str, factory: FeatureFactory, replace: bool = False) -> None:
    """Make ``factory(weights_path) -> module`` available as ``name``. A name is registered once:
    taking over a name other code relies on needs ``replace=True`` (said, never silent)."""
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"feature network name {name!r}: use letters, digits, '-' and '_'")
    if not callable(factory):
        raise TypeError("factory must be callable: factory(weights: Path) -> torch.nn.Module")
    if name in _REGISTRY and _REGISTRY[name] is not factory and not replace:
        raise ValueError(f"a feature network named {name!r} is registered already; pass replace=True to replace it")
    _REGISTRY[name] = factory


def feature_networks() -> list[str]:
    """The registered feature network names."""
    return sorted(_REGISTRY)


def load_feature_network(name: str | None, weights: str | Path) -> nn.Module:
    """The network ``name`` with ``weights``, in eval mode. ``weights``: a .safetensors file, or the
    NAME of weights added with :func:`add_feature_weights` (sha256-checked first; ``name=None``
    takes the network recorded with them)."""
    if weights is not None:
        name, weights, _ = resolve_feature_weights(weights, name)
    if name is None:
        raise UserError("feature weights were given without a feature network (--feature-network NAME)")
    return _build(name, weights)


def _build(name: str, weights: str | Path | None) -> nn.Module:
    """The network ``name`` from a .safetensors file (no name resolution)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown feature network {name!r}; registered: {', '.join(feature_networks()) or 'none'}")
    if weights is None:
        raise UserError(f"feature network {name}: give its weights (a .safetensors file, or a name added with "
                        "`meddiffusion models features add`)")
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{path}: feature network weights not found")
    if not path.name.lower().endswith(".safetensors"):
        raise UserError(f"{path}: feature network weights are read from .safetensors files only (pickled "
                        ".pt/.pth files are never loaded); convert them with safetensors.torch.save_file")
    net = _REGISTRY[name](path)
    if not isinstance(net, nn.Module):
        raise TypeError(f"feature network {name}: the factory returned {type(net).__name__}, not a torch.nn.Module")
    return net.eval()


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (no code runs); a damaged file is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from err


@torch.no_grad()
def extract_features(net: nn.Module, volumes: torch.Tensor, batch: int = 4) -> np.ndarray:
    """Features ``(N, F)`` of ``volumes`` ``(N, 1, D, H, W)``, ``batch`` volumes at a time."""
    out = []
    for i in range(0, volumes.shape[0], batch):
        f = net(volumes[i:i + batch].float())
        if f.ndim != 2 or f.shape[0] != volumes[i:i + batch].shape[0]:
            raise ValueError(f"a feature network must return (N, F) features, got {tuple(f.shape)}")
        out.append(f.double().cpu().numpy())
    return np.concatenate(out)


# -- the built-in MedicalNet-style ResNet-10 ------------------------------------------------------
def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions with batch norm and a residual (1x1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3(cin, cout, stride, dilation)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = _conv3(cout, cout, 1, dilation)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + skip)


class ResNet10Features(nn.Module):
    """MedicalNet-style 3-D ResNet-10 trunk: ``(N, 1, D, H, W)`` -> ``(N, widths[-1])`` features."""

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 256, 512), stem_kernel: int = 7):
        super().__init__()
        w0 = widths[0]
        self.widths = tuple(int(w) for w in widths)
        self.conv1 = nn.Conv3d(1, w0, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm3d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        plan = ((1, 1), (2, 1), (1, 2), (1, 4))  # (stride, dilation) of stages 1-4
        cin = w0
        for i, (w, (stride, dil)) in enumerate(zip(self.widths, plan), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock3d(cin, w, stride, dil)))
            cin = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
        x = (x - mean.view(-1, 1, 1, 1, 1)) / std.view(-1, 1, 1, 1, 1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3, 4))


def resnet10_from_safetensors(path: Path) -> ResNet10Features:
    """The built-in ``"resnet10"`` factory: stage widths read from the weights, then a strict load."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in load_safetensors(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}
    try:
        stem = state["conv1.weight"]
        widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
        if stem.ndim != 5 or stem.shape[1] != 1:
            raise KeyError("conv1.weight")
    except KeyError as err:
        raise UserError(f"{path}: not ResNet-10 feature weights (no 3-D {err.args[0]} tensor)") from None
    net = ResNet10Features(widths, int(stem.shape[2]))  # type: ignore[arg-type]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise UserError(f"{path}: these weights do not fit the ResNet-10 feature network "
                        f"({' '.join(str(err).split())[:300]})") from None
    missing = [k for k in missing if not k.endswith(".num_batches_tracked")]  # unused in eval mode; older files lack it
    if missing or unexpected:
        what = "; ".join(t for t in (f"missing {', '.join(missing[:4])}" if missing else "",
                                     f"unexpected {', '.join(unexpected[:4])}" if unexpected else "") if t)
        raise UserError(f"{path}: these weights do not fit the ResNet-10 feature network ({what})")
    return net


register_feature_network("resnet10", resnet10_from_safetensors)


# -- feature weights kept by the weights manager (``meddiffusion models features``) ----------------------
RECORD = "FEATURES.json"
WEIGHTS_FILE = "weights.safetensors"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_PICKLE_SUFFIXES = (".pth", ".pt")


def feature_weights_root() -> Path:
    """Where added feature weights live: ``MEDDIFFUSION_CACHE/features/<name>/``."""
    return cache_root() / "features"


def _is_name(value: Any) -> bool:
    """A string that can be a registered name (not a path, not a weights file name)."""
    return isinstance(value, str) and re.match(NAME_PATTERN, value) is not None \
        and not value.lower().endswith(_FILE_SUFFIXES)


def feature_weights_records() -> list[dict[str, Any]]:
    """The added feature weights, by name: each record (``name``, ``network``, ``sha256``, ``size``,
    ``source``, ``source_sha256``, ``added_at``, ...) with its ``path``."""
    out = []
    root = feature_weights_root()
    for rec in sorted(root.glob(f"*/{RECORD}")) if root.is_dir() else []:
        try:
            doc = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("name") == rec.parent.name and not rec.parent.name.startswith("."):
            out.append({**doc, "path": str(rec.parent / WEIGHTS_FILE)})
    return out


def feature_weights_record(name: str) -> dict[str, Any] | None:
    """The record of the feature weights added as ``name``, ``None`` when there are none."""
    if not _is_name(name):
        return None
    return next((r for r in feature_weights_records() if r["name"] == name), None)


def _registered_names() -> str:
    return ", ".join(r["name"] for r in feature_weights_records()) or "none"


def verify_feature_weights(name: str) -> tuple[str, str]:
    """``(state, detail)`` of the feature weights added as ``name``: ``"ok"``, ``"CORRUPT"`` (the
    stored file changed since it was added) or ``"missing"``. Unknown names raise :class:`WeightsError`."""
    rec = feature_weights_record(name)
    if rec is None:
        raise WeightsError(f"no feature weights named {name!r} (added: {_registered_names()})")
    path = Path(rec["path"])
    if not path.is_file():
        return "missing", f"{path} is gone: add the weights again"
    digest = sha256_file(path)
    if digest != rec.get("sha256"):
        return "CORRUPT", f"{path} changed since it was added (sha256 {digest[:16]}..., recorded " \
                          f"{str(rec.get('sha256'))[:16]}...)"
    return "ok", f"sha256 {digest}"


def resolve_feature_weights(weights: str | Path, network: str | None = None) -> tuple[str | None, Path, dict | None]:
    """``(network, file, record)`` for ``weights``: the NAME of added feature weights (their network,
    their file after a sha256 check, their record) or a path (``network`` as given, ``record`` None).

    A name recorded for another network than ``network``, a changed file and a name that is neither
    added nor an existing file raise :class:`WeightsError` (one line)."""
    rec = feature_weights_record(weights) if isinstance(weights, str) else None
    if rec is None:
        path = Path(weights).expanduser()
        if _is_name(weights) and not path.exists():
            raise WeightsError(f"no feature weights named {weights!r} and no such file (added: {_registered_names()}; "
                               "add them with `meddiffusion models features add NAME --network resnet10 "
                               "--weights FILE`)")
        return network, path, None
    if network is not None and network != rec["network"]:
        raise WeightsError(f"feature weights {rec['name']!r} were added for the network {rec['network']!r}, not "
                           f"{network!r}")
    state, detail = verify_feature_weights(rec["name"])
    if state != "ok":
        raise WeightsError(f"feature weights {rec['name']!r}: {detail}; remove them (`meddiffusion models features "
                           f"remove {rec['name']}`) and add them again")
    return rec["network"], Path(rec["path"]), rec


def state_dict_from_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch ``.pth``/``.pt`` file such as MedicalNet's ``resnet_10.pth``
    (``{"state_dict": {...}}`` or a bare state dict), read with the safe unpickler
    (``torch.load(weights_only=True)`` plus inert containers)
    (:func:`~MedDiffusionLib.io.safe_pickle.safe_load`): tensors and plain containers only, no code runs."""
    from ..io.safe_pickle import safe_load

    try:
        ckpt = safe_load(path)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe file
        raise WeightsError(f"{path}: not a PyTorch weights file that loads with weights_only=True "
                           f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors (expected {{'state_dict': {{name: tensor}}}} "
                           "or {name: tensor})")
    return {str(k): v.detach().contiguous() for k, v in state.items()}


def add_feature_weights(name: str, weights: str | Path, network: str = "resnet10",
                        description: str | None = None) -> dict[str, Any]:
    """Add a feature network's weights to the weights manager as ``name`` and return the record.

    ``weights``: a .safetensors file (copied) or a PyTorch ``.pth``/``.pt`` (converted, see
    :func:`state_dict_from_pickle`). The copy is loaded into ``network`` once before it is kept, so
    weights that do not fit are refused; nothing is left behind on an error. Names: lower-case
    letters, digits, '.', '_' and '-' (not ending in a file suffix); a name in use is refused."""
    from filelock import FileLock
    from safetensors.torch import save_file

    from ..io.atomic import atomic_write_text

    if not _is_name(name):
        raise WeightsError(f"feature weights name {name!r} is not allowed: use lower-case letters, digits, '.', '_' "
                           f"and '-', starting with a letter or digit, not ending in a file suffix ({NAME_PATTERN})")
    if network not in _REGISTRY:
        raise UserError(f"unknown feature network {network!r}; registered: {', '.join(feature_networks()) or 'none'}")
    src = Path(weights).expanduser()
    if not src.is_file():
        raise WeightsError(f"{src}: feature network weights not found")
    kind = "safetensors" if src.name.lower().endswith(".safetensors") else \
        "pytorch" if src.suffix.lower() in _PICKLE_SUFFIXES else None
    if kind is None:
        raise WeightsError(f"{src}: give a .safetensors file or a PyTorch .pth/.pt state dict")
    root = feature_weights_root()
    target = root / name
    if (target / RECORD).exists():
        raise WeightsError(f"feature weights {name!r} are added already; remove them first "
                           f"(`meddiffusion models features remove {name}`)")
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".add-*"):  # left by a killed add
        if time.time() - old.stat().st_mtime > 24 * 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f".add-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        dst = tmp / WEIGHTS_FILE
        source_sha256 = sha256_file(src)
        if kind == "safetensors":
            shutil.copyfile(src, dst)
        else:
            save_file(state_dict_from_pickle(src), str(dst))
        digest = sha256_file(dst)
        if kind == "safetensors" and digest != source_sha256:
            raise WeightsError(f"{src} changed while it was copied; try again")
        try:
            _build(network, dst)  # refuses weights that do not fit the network
        except UserError as err:
            raise WeightsError(str(err).replace(str(dst), str(src))) from None
        record = {"name": name, "network": network, "sha256": digest, "size": dst.stat().st_size,
                  "source": str(src.resolve()), "source_format": kind, "source_sha256": source_sha256,
                  "description": description or f"{network} weights from {src.name}",
                  "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
        with FileLock(str(root / f".{name}.lock")):
            if (target / RECORD).exists():
                raise WeightsError(f"feature weights {name!r} were added meanwhile by another process")
            if target.exists():
                shutil.rmtree(target)  # a folder without a record: not added
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "path": str(target / WEIGHTS_FILE)}


def remove_feature_weights(name: str) -> Path:
    """Delete the feature weights added as ``name``; the folder removed."""
    from filelock import FileLock

    if feature_weights_record(name) is None:
        raise WeightsError(f"no feature weights named {name!r} (added: {_registered_names()})")
    root = feature_weights_root()
    with FileLock(str(root / f".{name}.lock")):
        shutil.rmtree(root / name)
    return root / name


__all__ = ["frechet_distance", "feature_statistics", "register_feature_network", "feature_networks",
           "load_feature_network", "load_safetensors", "extract_features", "ResNet10Features",
           "resnet10_from_safetensors", "feature_weights_root", "feature_weights_records", "feature_weights_record",
           "resolve_feature_weights", "verify_feature_weights", "add_feature_weights", "remove_feature_weights",
           "state_dict_from_pickle"]
