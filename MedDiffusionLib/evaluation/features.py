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
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UserError

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


def load_feature_network(name: str, weights: str | Path) -> nn.Module:
    """The network ``name`` with ``weights`` (a .safetensors file), in eval mode."""
    if name not in _REGISTRY:
        raise UserError(f"unknown feature network {name!r}; registered: {', '.join(feature_networks()) or 'none'}")
    if weights is None:
        raise UserError(f"feature network {name}: give its weights (a .safetensors file)")
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
    if missing or unexpected:
        what = "; ".join(t for t in (f"missing {', '.join(missing[:4])}" if missing else "",
                                     f"unexpected {', '.join(unexpected[:4])}" if unexpected else "") if t)
        raise UserError(f"{path}: these weights do not fit the ResNet-10 feature network ({what})")
    return net


register_feature_network("resnet10", resnet10_from_safetensors)

__all__ = ["frechet_distance", "feature_statistics", "register_feature_network", "feature_networks",
           "load_feature_network", "load_safetensors", "extract_features", "ResNet10Features",
           "resnet10_from_safetensors"]
