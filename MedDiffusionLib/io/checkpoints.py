"""Official checkpoints (AE Lightning ``.ckpt``, BiFlowNet ``.pt``) and our own format
(``NAME.safetensors`` weights + ``NAME.json`` config), with errors that name the file and the problem.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.autoencoder import PatchVolumeAE
from ..models.biflownet import BiFlowNet
from ..models.controlnet import ControlLDM, ControlNet
from ..errors import UserError
from .atomic import atomic_write_bytes, atomic_write_text
from .safe_pickle import safe_load, to_plain

FORMAT_VERSION = 1
FAMILY_CLASSES: dict[str, type[nn.Module]] = {"patchvolume": PatchVolumeAE, "biflownet": BiFlowNet,
                                              "controlnet": ControlNet, "controlldm": ControlLDM}
FAMILIES = tuple(FAMILY_CLASSES)
AE_TRAINING_PREFIXES = ("volume_discriminator.", "perceptual_loss.")


class CheckpointError(UserError):
    """A weights file that cannot be used; the message names the file and says why."""


# -- reading ---------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Any:
    """Unpickle a PyTorch checkpoint safely (see :mod:`.safe_pickle`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        return safe_load(path)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        match = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if match:
            raise CheckpointError(f"{path}: refused to load: it contains the Python object '{match.group(1)}', "
                                  "which official MedDiffusion checkpoints never contain and which could run code "
                                  "when unpickled") from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({msg.splitlines()[-1][:200]})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # the unpickler raises many types for garbage input
        text = str(exc)
        hint = " (the file looks truncated: download it again)" if (
            "central directory" in text or "EOF" in type(exc).__name__ or "truncated" in text.lower()
            or "failed reading" in text) else ""
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint{hint}: {text.splitlines()[0][:200]}") from exc


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the {type(model).__name__} built from its config: "
                              + "; ".join(problems))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model


# -- official autoencoder ----------------------------------------------------------------------------
def _is_ae_state(sd: Any) -> bool:
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("encoder.") for k in sd)


def _is_biflownet_state(sd: Any) -> bool:
    return isinstance(sd, dict) and any(isinstance(k, str) and k.endswith("x_embedder.proj.weight") for k in sd)


def infer_autoencoder_config(sd: dict[str, torch.Tensor], yaml_cfg: dict[str, Any] | None = None,
                             patch_size: int = 64) -> dict[str, Any]:
    """Constructor arguments of :class:`PatchVolumeAE` from a state dict (and the YAML when present)."""
    model_cfg = dict((yaml_cfg or {}).get("model", {}))
    data_cfg = dict((yaml_cfg or {}).get("dataset", {}))
    levels = len({k.split(".")[2] for k in sd if re.match(r"encoder\.conv_blocks\.\d+\.down\.weight", k)})
    emb = sd["codebook.embeddings"]
    return dict(
        n_hiddens=int(model_cfg.get("n_hiddens", sd["encoder.conv_first.weight"].shape[0])),
        downsample=[int(v) for v in model_cfg.get("downsample", [2 ** levels] * 3)],
        image_channels=int(data_cfg.get("image_channels", sd["encoder.conv_first.weight"].shape[1])),
        norm_type=str(model_cfg.get("norm_type", "group")),
        num_groups=int(model_cfg.get("num_groups", 24)),
        embedding_dim=int(model_cfg.get("embedding_dim", emb.shape[1])),
        n_codes=int(model_cfg.get("n_codes", emb.shape[0])),
        patch_size=int(data_cfg.get("patch_size", patch_size)),
    )


def load_official_autoencoder(path: str | Path) -> PatchVolumeAE:
    """Released ``PatchVolume_*.ckpt`` -> :class:`PatchVolumeAE` in eval mode (training-only
    discriminator and LPIPS tensors are dropped)."""
    return _autoencoder_from(read_checkpoint(path), path)


def _autoencoder_from(ckpt: Any, path: str | Path) -> PatchVolumeAE:
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not _is_ae_state(sd):
        if isinstance(ckpt, dict) and ("ema" in ckpt or _is_biflownet_state(sd) or _is_biflownet_state(ckpt)):
            raise CheckpointError(f"{path}: this is a BiFlowNet (diffusion model) checkpoint, not a Patch-Volume "
                                  "autoencoder; pass it as the BiFlowNet weights")
        raise CheckpointError(f"{path}: not a Patch-Volume autoencoder checkpoint (no 'state_dict' with encoder.* keys)")
    sd = {k: v for k, v in sd.items() if not k.startswith(AE_TRAINING_PREFIXES)}
    hp = to_plain(ckpt.get("hyper_parameters") or {})
    yaml_cfg = hp.get("cfg") if isinstance(hp, dict) else None
    try:
        cfg = infer_autoencoder_config(sd, yaml_cfg if isinstance(yaml_cfg, dict) else None)
        model = PatchVolumeAE(**cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot derive the autoencoder configuration: {exc}") from exc
    return load_strict(model, sd, str(path)).eval()


# -- official BiFlowNet -------------------------------------------------------------------------------
def infer_biflownet_config(sd: dict[str, torch.Tensor], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments of :class:`BiFlowNet` from the tensor shapes, cross-checked with the
    training ``args`` (model_dim, dim_mults, use_attn, patch_size, num_dit, num_classes ...)."""
    args = args or {}
    w = sd["init_conv.weight"]
    dim, channels = int(w.shape[0]), int(w.shape[1])
    patch = int(sd["x_embedder.proj.weight"].shape[-1])
    n_levels = len({k.split(".")[1] for k in sd if re.match(r"downs\.\d+\.0\.block1\.proj\.weight", k)})
    dim_mults = [int(sd[f"downs.{i}.0.block1.proj.weight"].shape[0]) // dim for i in range(n_levels)]
    attn = [int(f"downs.{i}.1.fn.norm.gamma" in sd) for i in range(n_levels)]
    cond = int(sd["cond_emb.weight"].shape[0]) if "cond_emb.weight" in sd else None
    num_mid = len({k.split(".")[1] for k in sd if k.startswith("IntraPatchFlow_mid.")})
    heads_unet = int(sd[next(k for k in sd if k.endswith("fn.fn.to_qkv.weight"))].shape[0]) // 96 if any(attn) else 8
    cfg = dict(dim=dim, learn_sigma=int(sd["final_conv.1.weight"].shape[0]) == 2 * channels, cond_classes=cond,
               dim_mults=dim_mults, sub_volume_size=[8, 8, 8], patch_size=patch, channels=channels,
               attn_heads=heads_unet, init_dim=None, init_kernel_size=int(w.shape[-1]), use_sparse_linear_attn=attn,
               resnet_groups=int(args.get("resnet_groups", 24)), DiT_num_heads=int(args.get("DiT_num_heads", 8)),
               mlp_ratio=int(sd["IntraPatchFlow_mid.0.mlp.fc1.weight"].shape[0]) // dim if num_mid else 4,
               vq_size=int(args.get("vq_size", 64)), res_condition="res_mlp.0.weight" in sd,
               num_mid_DiT=num_mid)
    for arg_name, key in (("model_dim", "dim"), ("patch_size", "patch_size"), ("num_classes", "cond_classes"),
                          ("volume_channels", "channels")):
        if arg_name in args and args[arg_name] is not None and int(args[arg_name]) != cfg[key]:
            raise ValueError(f"training args say {arg_name}={args[arg_name]} but the weights have {key}={cfg[key]}")
    return cfg


def load_official_biflownet(path: str | Path, weights: str = "ema") -> BiFlowNet:
    """Released ``BiFlowNet_*.pt`` -> :class:`BiFlowNet` (EMA weights by default), eval mode."""
    return _biflownet_from(read_checkpoint(path), path, weights)


def load_official(path: str | Path) -> tuple[str, nn.Module]:
    """Either official checkpoint, read once: ``("patchvolume", ae)`` or ``("biflownet", net)``."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and _is_ae_state(ckpt.get("state_dict")):
        return "patchvolume", _autoencoder_from(ckpt, path)
    return "biflownet", _biflownet_from(ckpt, path, "ema")


def _biflownet_from(ckpt: Any, path: str | Path, weights: str) -> BiFlowNet:
    if isinstance(ckpt, dict) and _is_ae_state(ckpt.get("state_dict")):
        raise CheckpointError(f"{path}: this is a Patch-Volume autoencoder checkpoint, not a BiFlowNet; "
                              "pass it as the autoencoder weights")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a BiFlowNet checkpoint (expected a dict with 'ema'/'model')")
    sd = ckpt.get(weights)
    if sd is None and _is_biflownet_state(ckpt):
        sd = ckpt
    if not _is_biflownet_state(sd):
        raise CheckpointError(f"{path}: not a BiFlowNet checkpoint (no '{weights}' state dict with BiFlowNet keys)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    args = to_plain(ckpt.get("args")) if ckpt.get("args") is not None else {}
    try:
        model = BiFlowNet(**infer_biflownet_config(sd, args if isinstance(args, dict) else {}))
    except (KeyError, ValueError, TypeError, StopIteration) as exc:
        raise CheckpointError(f"{path}: cannot derive the BiFlowNet configuration: {exc}") from exc
    return load_strict(model, sd, str(path)).eval()


# -- our format -----------------------------------------------------------------------------------------
def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    """The model of ``family`` built from its saved constructor arguments."""
    if family not in FAMILY_CLASSES:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILY_CLASSES[family](**config)


def model_family(model: nn.Module) -> str:
    for family, cls in FAMILY_CLASSES.items():
        if type(model) is cls:
            return family
    raise TypeError(f"no file format for {type(model).__name__}")


def _pair(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_model(model: nn.Module, path: str | Path, config: dict[str, Any] | None = None,
               meta: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` + ``path.json``, each atomically (:mod:`.atomic`); the config is
    written last, so a complete pair means a complete save."""
    from safetensors.torch import save

    weights, cfg_path = _pair(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": "meddiffusion", "format_version": FORMAT_VERSION, "family": model_family(model),
           "config": config if config is not None else model.config, "meta": meta or {}}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, save(state, metadata={"format": "meddiffusion", "family": doc["family"]}))
    atomic_write_text(cfg_path, json.dumps(doc, indent=2))
    return weights


def read_model_config(path: str | Path) -> dict[str, Any]:
    _, cfg_path = _pair(path)
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: config file not found (expected next to the .safetensors weights)")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if doc.get("format") != "meddiffusion" or "family" not in doc or "config" not in doc:
        raise CheckpointError(f"{cfg_path}: not a MedDiffusion model config")
    return doc


def load_model(path: str | Path, expect: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model` (eval mode). ``expect`` checks the family."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = _pair(path)
    doc = read_model_config(path)
    if expect is not None and doc["family"] != expect:
        raise CheckpointError(f"{weights}: holds a {doc['family']} model, but a {expect} model is needed here")
    if not weights.exists():
        raise CheckpointError(f"{weights}: weights file not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
    try:
        model = build_model(doc["family"], doc["config"])
    except TypeError as exc:
        raise CheckpointError(f"{weights}: config does not describe a {doc['family']} model: {exc}") from exc
    return load_strict(model, state, str(weights)).eval()


def load_any(path: str | Path, expect: str) -> nn.Module:
    """Our format (``.safetensors``/``.json``/stem) or an official checkpoint, by file type."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json") or _pair(p)[1].exists() and not p.is_file():
        return load_model(p, expect)
    if expect == "patchvolume":
        return load_official_autoencoder(p)
    if expect == "biflownet":
        return load_official_biflownet(p)
    raise CheckpointError(f"{p}: no official checkpoint format exists for {expect}; use a .safetensors file")


def fingerprint(model: nn.Module) -> str:
    """Short stable hash of a model's weights (identifies the base a ControlNet was trained on)."""
    import hashlib

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
