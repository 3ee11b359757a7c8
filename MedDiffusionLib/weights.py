"""Finding, downloading, verifying and converting model weights.

* Bundled models live in ``resources/models/`` (our safetensors + JSON format).
* Hub models are fetched with ``huggingface_hub`` into the standard HF cache
  (``HF_HOME``/``HF_HUB_CACHE``), honour ``HF_HUB_OFFLINE`` / ``local_files_only`` and
  ``HF_ENDPOINT``, and are checked against the registry's sha256 when it is known; a mismatching
  file is removed from the cache.
* A local file or folder (weights downloaded by hand) can replace the download.
* Official checkpoints are converted once to our format under ``MEDDIFFUSION_CACHE``
  (default ``~/.cache/meddiffusion``) and the converted copy is reused.

This module imports torch only when converting or loading.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .registry import RESOURCES, ModelEntry, RegistryError, get_model

ROLES = ("autoencoder", "biflownet")


class WeightsError(UserError):
    """Weights that are missing, corrupt or unusable; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("MEDDIFFUSION_CACHE", Path.home() / ".cache" / "meddiffusion"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _bundled_paths(entry: ModelEntry) -> dict[str, Path]:
    out = {}
    for f in entry.files:
        stem = RESOURCES / f["path"]
        weights = stem.with_suffix(".safetensors")
        if not weights.exists():
            raise WeightsError(f"bundled weights {weights} are missing from this installation; reinstall MedDiffusion")
        if f.get("sha256") and sha256_file(weights) != f["sha256"]:
            raise WeightsError(f"bundled weights {weights} do not match their registered sha256; reinstall MedDiffusion")
        out[f["role"]] = weights
    return out


def bundled_ae_width(entry: ModelEntry) -> int | None:
    """``n_hiddens`` of a bundled model's autoencoder (from its JSON config, no weights read);
    ``None`` for downloadable models (the estimator then assumes the released width)."""
    if not entry.bundled:
        return None
    for f in entry.files:
        if f["role"] == "autoencoder":
            doc = json.loads((RESOURCES / f["path"]).with_suffix(".json").read_text())
            return int(doc["config"]["n_hiddens"])
    return None


def _missing_message(entry: ModelEntry, filename: str, why: str) -> str:
    src = entry.source
    lines = [f"weights for model {entry.id!r} are not available: {why}.",
             f"  - online: run `meddiffusion models download {entry.id}` (hub repo {src.get('repo_id')}, file {filename})",
             "  - offline: copy the files on a machine with internet into the Hugging Face cache (same command there, "
             "then copy ~/.cache/huggingface), or",
             f"  - point to files you downloaded yourself: --weights FOLDER (a folder with {filename} ...) "]
    if src.get("manual_download"):
        lines.append(f"    source: {src['manual_download']}")
    return "\n".join(lines)


def _remove_cached(path: Path) -> None:
    """Delete a cached hub file: the snapshot link and the blob it points to."""
    target = path.resolve()
    for p in {path, target}:
        try:
            if p.is_symlink() or p.exists():
                p.unlink()
        except OSError:
            pass


def download_file(entry: ModelEntry, spec: dict[str, Any], local_files_only: bool | None = None,
                  progress: bool = True) -> Path:
    """One registry file from the hub (or the HF cache), sha256-checked when known."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    src = entry.source
    if src["kind"] != "hub":
        raise WeightsError(f"model {entry.id!r} is not downloaded from the hub")
    only_local = offline() if local_files_only is None else local_files_only
    filename = spec["filename"]
    try:
        path = Path(hf_hub_download(src["repo_id"], filename, revision=spec.get("revision") or src.get("revision"),
                                    local_files_only=only_local, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                    tqdm_class=None if progress else _SilentTqdm))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        why = "offline mode is on and the file is not in the cache" if only_local or offline() else \
            f"the hub could not be reached and the file is not cached ({type(exc).__name__})"
        raise WeightsError(_missing_message(entry, filename, why)) from exc
    except Exception as exc:  # network errors, HTTP errors, broken connections
        raise WeightsError(_missing_message(entry, filename, f"download failed: {type(exc).__name__}: {exc}")) from exc
    if spec.get("sha256"):
        digest = sha256_file(path)
        if digest != spec["sha256"]:
            _remove_cached(path)
            raise WeightsError(f"{filename} of model {entry.id!r} failed its checksum (sha256 {digest[:16]}..., "
                               f"expected {spec['sha256'][:16]}...); the corrupt file was removed from the cache. "
                               "Run the command again to download it afresh.")
    return path


class _SilentTqdm:  # tqdm-compatible no-op for quiet downloads
    def __init__(self, *a: Any, **k: Any) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "_SilentTqdm":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def set_description(self, *a: Any, **k: Any) -> None:
        pass


def _local_paths(entry: ModelEntry | None, folder: Path) -> dict[str, Path]:
    """Files for each role in a user folder: our converted names first, then official names."""
    found: dict[str, Path] = {}
    for role in ROLES:
        ours = folder / f"{role}.safetensors"
        if ours.exists():
            found[role] = ours
            continue
        names = [f["filename"] for f in (entry.files if entry else []) if f["role"] == role and "filename" in f]
        names += [p.name for p in sorted(folder.glob("PatchVolume*.ckpt" if role == "autoencoder" else "BiFlowNet*.pt"))]
        for name in names:
            if (folder / name).exists():
                found[role] = folder / name
                break
    missing = [r for r in ROLES if r not in found]
    if missing:
        raise WeightsError(f"{folder}: no {' and no '.join(missing)} weights found (expected autoencoder.safetensors / "
                           "biflownet.safetensors, or official PatchVolume_*.ckpt / BiFlowNet_*.pt)")
    return found


def resolve_weights(model: str | None = None, weights: str | Path | None = None,
                    local_files_only: bool | None = None) -> tuple[ModelEntry | None, dict[str, Path]]:
    """Paths of the autoencoder and BiFlowNet files for a registry id and/or a local folder."""
    entry = None
    if model is not None or weights is None:
        entry = get_model(model)
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.exists():
            raise WeightsError(f"{folder}: weights folder not found")
        if not folder.is_dir():
            raise WeightsError(f"{folder}: expected a folder holding the autoencoder and BiFlowNet files")
        return entry, _local_paths(entry, folder)
    assert entry is not None
    if entry.bundled:
        return entry, _bundled_paths(entry)
    return entry, {f["role"]: download_file(entry, f, local_files_only) for f in entry.files if f["role"] in ROLES}


def _converted_dir(src: Path) -> Path:
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:20]
    return cache_root() / "converted" / key


def converted_path(src: Path, role: str, log: Callable[[str], None] | None = None) -> Path:
    """Our-format copy of an official checkpoint, converted on first use and reused after."""
    from .io.checkpoints import load_official_autoencoder, load_official_biflownet, save_model

    if src.suffix == ".safetensors":
        return src
    from filelock import FileLock

    from .io.atomic import atomic_write_text

    out_dir = _converted_dir(src)
    stem = out_dir / role
    done = lambda: stem.with_suffix(".safetensors").exists() and stem.with_suffix(".json").exists()  # noqa: E731
    if done():
        return stem.with_suffix(".safetensors")
    out_dir.mkdir(parents=True, exist_ok=True)
    # one converter at a time (torchrun ranks, parallel jobs); the others wait, then reuse its files
    with FileLock(str(out_dir / f"{role}.lock")):
        if not done():
            if log:
                log(f"converting {src.name} to safetensors (once) ...")
            model = load_official_autoencoder(src) if role == "autoencoder" else load_official_biflownet(src)
            save_model(model, stem, meta={"converted_from": str(src), "source_size": src.stat().st_size})
            atomic_write_text(out_dir / "SOURCE.json", json.dumps({"source": str(src)}))
    return stem.with_suffix(".safetensors")


def load_models(model: str | None = None, weights: str | Path | None = None, local_files_only: bool | None = None,
                log: Callable[[str], None] | None = None):
    """(entry, autoencoder, biflownet) ready for inference (CPU, eval mode)."""
    from .io.checkpoints import load_model

    entry, paths = resolve_weights(model, weights, local_files_only)
    ae = load_model(converted_path(paths["autoencoder"], "autoencoder", log), expect="patchvolume")
    net = load_model(converted_path(paths["biflownet"], "biflownet", log), expect="biflownet")
    if ae.latent_channels != net.channels:
        raise WeightsError(f"autoencoder latents have {ae.latent_channels} channels but the BiFlowNet expects "
                           f"{net.channels}: these files do not belong together")
    return entry, ae, net


def status(entry: ModelEntry) -> dict[str, Any]:
    """Download state of each file: 'bundled', 'cached' (with size) or 'missing'."""
    from huggingface_hub import try_to_load_from_cache

    out = {}
    for f in entry.files:
        if entry.bundled:
            p = (RESOURCES / f["path"]).with_suffix(".safetensors")
            out[f["role"]] = {"state": "bundled" if p.exists() else "missing", "path": str(p),
                              "size": p.stat().st_size if p.exists() else None}
            continue
        src = entry.source
        hit = try_to_load_from_cache(src["repo_id"], f["filename"], revision=f.get("revision") or src.get("revision"))
        if isinstance(hit, str) and Path(hit).exists():
            out[f["role"]] = {"state": "cached", "path": hit, "size": Path(hit).stat().st_size}
        else:
            out[f["role"]] = {"state": "missing", "path": None, "size": f.get("size")}
    return out


def verify(entry: ModelEntry) -> list[tuple[str, str, str]]:
    """(role, state, detail) per file: sha256 checked where the registry has one."""
    rows = []
    for role, st in status(entry).items():
        spec = entry.file(role)
        if st["state"] == "missing":
            rows.append((role, "missing", "not downloaded"))
            continue
        path = Path(st["path"])
        digest = sha256_file(path)
        if spec.get("sha256") is None:
            rows.append((role, "unverified", f"sha256 {digest} (registry has none yet)"))
        elif digest == spec["sha256"]:
            rows.append((role, "ok", f"sha256 {digest}"))
        else:
            rows.append((role, "CORRUPT", f"sha256 {digest} != registry {spec['sha256']}"))
    return rows


__all__ = ["WeightsError", "RegistryError", "resolve_weights", "load_models", "download_file", "status", "verify",
           "sha256_file", "cache_root"]


def resolve_controlnet(name_or_path: str | Path) -> Path:
    """A ControlNet file path, a run folder holding ``controlnet.safetensors``, or the name of a
    bundled one (``chest-ct-mini-labels`` ...)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "controlnet.safetensors").exists():  # a train-controlnet run folder
        return p / "controlnet.safetensors"
    if p.is_file() or p.with_suffix(".safetensors").exists():
        return p
    bundled = RESOURCES / "models" / str(name_or_path) / "controlnet.safetensors"
    if bundled.exists():
        return bundled
    known = sorted(d.name for d in (RESOURCES / "models").iterdir() if (d / "controlnet.safetensors").exists()) \
        if (RESOURCES / "models").exists() else []
    raise WeightsError(f"ControlNet {name_or_path!r} not found: not a file, and not a bundled ControlNet "
                       f"({', '.join(known) or 'none bundled'})")
