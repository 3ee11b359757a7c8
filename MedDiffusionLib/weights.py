"""Finding, downloading, verifying and converting model weights.

* Bundled models live in ``resources/models/`` (our safetensors + JSON format).
* Hub models are fetched with ``huggingface_hub`` into the standard HF cache
  (``HF_HOME``/``HF_HUB_CACHE``), honour ``HF_HUB_OFFLINE`` / ``local_files_only`` and
  ``HF_ENDPOINT``, and are checked against the registry's sha256 when it is known; a mismatching
  file is removed from the cache.
* A local file or folder (weights downloaded by hand) can replace the download.
* Official checkpoints are converted once to our format under ``MEDDIFFUSION_CACHE``
  (default ``~/.cache/meddiffusion``) and the converted copy is reused.
* Files downloaded by hand can be *imported* for a registry model (:func:`import_weights`,
  ``meddiffusion models import``): checked, converted and moved into
  ``MEDDIFFUSION_CACHE/models/<id>/``; the model then reads "downloaded" and loads by its id.
  Users register their own models in the user registry (:func:`add_user_model`,
  :func:`remove_user_model`; see :mod:`.registry`).

This module imports torch only when converting or loading.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .errors import SetupError
from .paths import RESOURCES, converted_root, imported_dir, imports_root, user_registry_path
from .registry import (ModelEntry, RegistryError, builtin_ids, class_names, get_model, models, read_user_registry, schema,
                       validate_model)

ROLES = ("autoencoder", "biflownet")


class WeightsError(SetupError):
    """Weights that are missing, corrupt or unusable; the message says what to do."""


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
             f"  - files you downloaded yourself: `meddiffusion models import FOLDER --as {entry.id}` (once; "
             f"then --model {entry.id} works), or --weights FOLDER (a folder with {filename} ...) "]
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
    if src["kind"] == "local":
        raise WeightsError(f"model {entry.id!r} has no download: its files come from a folder"
                           + (f" ({src['folder']})" if src.get("folder") else "")
                           + f"; import them with `meddiffusion models import FOLDER --as {entry.id}`")
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
    if spec.get("format") == "meddiffusion" and filename.endswith(".safetensors"):  # its config goes with it
        json_spec = {"filename": filename[: -len(".safetensors")] + ".json", "revision": spec.get("revision")}
        download_file(entry, json_spec, local_files_only, progress)
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
    imported = imported_files(entry)
    if imported is not None:
        return entry, imported
    if entry.source["kind"] == "local":
        raise WeightsError(f"weights for model {entry.id!r} are not imported: run `meddiffusion models import FOLDER "
                           f"--as {entry.id}` with the folder of its files")
    return entry, {f["role"]: download_file(entry, f, local_files_only) for f in entry.files if f["role"] in ROLES}


def _converted_dir(src: Path) -> Path:
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:20]
    return converted_root() / key


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
    """Download state of each file: 'bundled', 'cached' (with size; ``imported: True`` for files
    brought in by :func:`import_weights`) or 'missing'."""
    from huggingface_hub import try_to_load_from_cache

    out: dict[str, Any] = {}
    imported = None if entry.bundled else imported_files(entry)
    for f in entry.files:
        if imported is not None and f["role"] in imported:
            p = imported[f["role"]]
            out[f["role"]] = {"state": "cached", "path": str(p), "size": p.stat().st_size, "imported": True}
            continue
        if entry.bundled:
            p = (RESOURCES / f["path"]).with_suffix(".safetensors")
            out[f["role"]] = {"state": "bundled" if p.exists() else "missing", "path": str(p),
                              "size": p.stat().st_size if p.exists() else None}
            continue
        src = entry.source
        if src["kind"] != "hub":
            out[f["role"]] = {"state": "missing", "path": None, "size": f.get("size")}
            continue
        hit = try_to_load_from_cache(src["repo_id"], f["filename"], revision=f.get("revision") or src.get("revision"))
        if isinstance(hit, str) and Path(hit).exists():
            out[f["role"]] = {"state": "cached", "path": hit, "size": Path(hit).stat().st_size}
        else:
            out[f["role"]] = {"state": "missing", "path": None, "size": f.get("size")}
    return out


def verify(entry: ModelEntry) -> list[tuple[str, str, str]]:
    """(role, state, detail) per file: sha256 checked where the registry has one."""
    rows = []
    manifest = None if entry.bundled else _read_manifest(entry)
    for role, st in status(entry).items():
        spec = entry.file(role)
        if st["state"] == "missing":
            rows.append((role, "missing", "not downloaded"))
            continue
        if st.get("imported") and manifest is not None:
            rows.append((role, *_verify_imported(spec, Path(st["path"]), manifest["files"].get(role, {}))))
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
           "sha256_file", "import_weights", "add_user_model", "remove_user_model", "remove_imported",
           "imported_dir", "imported_files", "weights_version"]


# -- imported weights: files downloaded by hand, converted into the cache for a registry model ---------------
MANIFEST = "IMPORTED.json"
Progress = Callable[[str, float], None]
"""``progress(line, fraction)``: one human-readable line per step and the fraction done (0..1)."""


def _read_manifest(entry: ModelEntry) -> dict[str, Any] | None:
    path = imported_dir(entry.id) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("model_id") != entry.id or doc.get("compression") != entry.compression \
            or not isinstance(doc.get("files"), dict):
        return None  # left by another model of that id (removed since): not this model's files
    return doc


def imported_files(entry: ModelEntry) -> dict[str, Path] | None:
    """``{role: converted .safetensors}`` when weights were imported for ``entry``, else ``None``."""
    if _read_manifest(entry) is None:
        return None
    folder = imported_dir(entry.id)
    out = {role: folder / f"{role}.safetensors" for role in ROLES}
    if all(p.exists() and p.with_suffix(".json").exists() for p in out.values()):
        return out
    return None


def _verify_imported(spec: dict[str, Any], path: Path, info: dict[str, Any]) -> tuple[str, str]:
    digest = sha256_file(path)
    if info.get("sha256") and digest != info["sha256"]:
        return "CORRUPT", f"imported copy {path} changed since the import (sha256 {digest[:16]}...): import again"
    src = f"imported from {info.get('source', '?')} (source sha256 {info.get('source_sha256')})"
    if spec.get("sha256") and spec.get("format") == info.get("source_format"):
        if info.get("source_sha256") == spec["sha256"]:
            return "ok", src
        return "CORRUPT", f"{src} != registry {spec['sha256']}"
    return "unverified", f"{src}; the registry has no sha256 for it"


def _report(progress: Progress | None) -> Progress:
    return progress or (lambda line, fraction: None)


def _check_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: weights folder not found")
    if not path.is_dir():
        raise WeightsError(f"{path}: expected a folder holding the autoencoder and BiFlowNet files")
    return path


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _convert_folder(paths: dict[str, Path], out: Path, report: Progress) -> dict[str, dict[str, Any]]:
    """Read, check and convert each file of ``paths`` into ``out/<role>.safetensors|json``; what was
    found per role (source name, format, sha256, size, config)."""
    from .io.checkpoints import load_model, load_official_autoencoder, load_official_biflownet, save_model

    infos: dict[str, dict[str, Any]] = {}
    for i, role in enumerate(ROLES):
        src = paths[role]
        size = src.stat().st_size
        tag = f"[{i + 1}/{len(ROLES)}] {role}"
        report(f"{tag}: reading {src.name} ({_human(size)}) ...", i / len(ROLES))
        t0 = time.time()
        fmt = "meddiffusion" if src.suffix == ".safetensors" else "official"
        family = "patchvolume" if role == "autoencoder" else "biflownet"
        if fmt == "meddiffusion":
            model = load_model(src, expect=family)
        else:
            model = load_official_autoencoder(src) if role == "autoencoder" else load_official_biflownet(src)
        digest = sha256_file(src)
        written = save_model(model, out / role, meta={"converted_from": src.name, "source_sha256": digest})
        config = json.loads(json.dumps(model.config))
        del model
        c = config
        what = (f"{c['downsample'][0]}x, {c['n_hiddens']} hidden channels, {c['n_codes']} codes" if role == "autoencoder"
                else f"dim {c['dim']}, {c['cond_classes'] or 'no'} classes, patch size {c['patch_size']}")
        infos[role] = {"source": src.name, "source_format": fmt, "source_sha256": digest, "source_size": size,
                       "sha256": sha256_file(written), "size": written.stat().st_size, "config": config}
        report(f"{tag}: {src.name} ok ({what}); converted in {time.time() - t0:.1f} s", (i + 1) / len(ROLES))
    ae, bf = infos["autoencoder"]["config"], infos["biflownet"]["config"]
    if int(ae["embedding_dim"]) != int(bf["channels"]):
        raise WeightsError(f"{paths['autoencoder'].name} makes latents with {ae['embedding_dim']} channels but "
                           f"{paths['biflownet'].name} expects {bf['channels']}: these files do not belong together")
    return infos


def _mismatches(entry: ModelEntry, infos: dict[str, dict[str, Any]]) -> list[str]:
    """Why the converted files cannot be ``entry``'s weights (empty when they fit)."""
    ae, bf = infos["autoencoder"]["config"], infos["biflownet"]["config"]
    out = []
    if int(ae["downsample"][0]) != entry.compression:
        out.append(f"the autoencoder compresses {ae['downsample'][0]}x, the model is {entry.compression}x")
    for role, expected in entry.architecture.items():
        have = infos[role]["config"]
        for key, value in expected.items():
            if key not in have or json.dumps(have[key], sort_keys=True) != json.dumps(value, sort_keys=True):
                out.append(f"{role} {key} is {json.dumps(have.get(key))}, the registry says {json.dumps(value)}")
    n_classes = int(bf["cond_classes"] or 0)
    beyond = [i for i in entry.class_indices if i >= max(n_classes, 1)]
    if beyond:
        out.append(f"the BiFlowNet knows {n_classes or 'no'} classes, the model lists class(es) {beyond}")
    for role in ROLES:
        spec = next((f for f in entry.files if f["role"] == role), {})
        info = infos[role]
        if spec.get("sha256") and spec.get("format") == info["source_format"] \
                and spec["sha256"] != info["source_sha256"]:
            out.append(f"{info['source']} does not match the registered sha256 of the {role} "
                       f"({info['source_sha256'][:16]}... vs {spec['sha256'][:16]}...: corrupt, or another release)")
    return out


def _named_like(entry: ModelEntry, infos: dict[str, dict[str, Any]]) -> bool:
    return all(any(f.get("filename") == infos[f["role"]]["source"] for f in entry.files if f["role"] == role)
               for role in ROLES)


def _pick_model(infos: dict[str, dict[str, Any]]) -> ModelEntry:
    """The one registry model these files fit: same compression, the registry's architecture and
    checksums where it has them; names or a declared architecture break a tie."""
    comp = int(infos["autoencoder"]["config"]["downsample"][0])
    candidates = [m for m in models() if not m.bundled]
    fits = [m for m in candidates if not _mismatches(m, infos)]
    if len(fits) > 1:
        strong = [m for m in fits if m.architecture or _named_like(m, infos)]
        if len(strong) == 1:
            return strong[0]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise WeightsError(f"these files fit several models ({', '.join(m.id for m in fits)}); choose one with "
                           "--as ID (import_weights(folder, model_id=...))")
    why = "; ".join(f"{m.id}: {_mismatches(m, infos)[0]}" for m in candidates) or "no model takes imported weights"
    raise WeightsError(f"these files ({comp}x autoencoder) match no registry model ({why}). Register your own model "
                       "with `meddiffusion models add ID --weights FOLDER`")


def _one_pair(folder: Path) -> dict[str, Path]:
    """The autoencoder and BiFlowNet of a folder that must hold exactly one pair."""
    for role, pattern in (("autoencoder", "PatchVolume*.ckpt"), ("biflownet", "BiFlowNet*.pt")):
        found = sorted(p.name for p in folder.glob(pattern))
        if not (folder / f"{role}.safetensors").exists() and len(found) > 1:
            raise WeightsError(f"{folder} holds several {role} files ({', '.join(found)}): keep one autoencoder and "
                               "one BiFlowNet per folder, or name the model with --as ID")
    return _local_paths(None, folder)


def _import_paths(folder: Path, entry: ModelEntry | None) -> dict[str, Path]:
    """The files to import: the entry's registered names first; without an entry, the one model whose
    registered file names are all in the folder, else the folder's single pair."""
    if entry is not None:
        return _local_paths(entry, folder)
    named = [m for m in models() if not m.bundled and all(
        any((folder / f["filename"]).is_file() for f in m.files if f["role"] == role and f.get("filename"))
        for role in ROLES)]
    if len(named) > 1:
        raise WeightsError(f"{folder} holds the files of several models ({', '.join(m.id for m in named)}): import "
                           "one at a time with --as ID")
    return _local_paths(named[0], folder) if named else _one_pair(folder)


def _new_temp_dir() -> Path:
    """A fresh folder beside the imported models (same file system, so the final move is a rename);
    leftovers of killed imports (dead process, older than 10 minutes) are removed first."""
    root = imports_root()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".import-*"):
        match = re.match(r"\.import-(\d+)-", old.name)
        try:
            stale = time.time() - old.stat().st_mtime > 600
            if match and stale:
                os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = root / f".import-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _install(model_id: str, tmp: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, then rename ``tmp`` to the model's folder (replacing an older import)."""
    from filelock import FileLock

    from .io.atomic import atomic_write_text

    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    target = imported_dir(model_id)
    with FileLock(str(imports_root() / f".{model_id}.lock")):
        old = None
        if target.exists():
            old = imports_root() / f".{model_id}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _manifest(entry_id: str, compression: int, folder: Path, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from . import __version__

    return {"model_id": entry_id, "compression": compression, "source_folder": str(folder.resolve()),
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meddiffusion": __version__,
            "files": {role: {k: v for k, v in info.items() if k != "config"} for role, info in infos.items()}}


def import_weights(folder: str | Path, model_id: str | None = None, progress: Progress | None = None) -> ModelEntry:
    """Check a folder of weights (the authors' ``PatchVolume_*.ckpt`` + ``BiFlowNet_*.pt``, or converted
    ``autoencoder``/``biflownet`` ``.safetensors`` + ``.json``), convert it into
    ``MEDDIFFUSION_CACHE/models/<id>/`` and return the registry entry it now serves.

    ``model_id=None`` picks the registry model the files fit (compression, registry architecture,
    checksums); several or none is a :class:`WeightsError`. Conversion happens in a temporary folder
    beside the target that is renamed when complete: on any error nothing is left behind and an
    earlier import stays. ``progress(line, fraction)`` gets one line per step. Loads nothing into a
    running service: its next job for that id reads the new files once its cached model is dropped."""
    report = _report(progress)
    folder = _check_folder(folder)
    entry = get_model(model_id) if model_id else None
    if entry is not None and entry.bundled:
        raise WeightsError(f"{entry.id} is bundled with MedDiffusion: it needs no import")
    paths = _import_paths(folder, entry)
    tmp = _new_temp_dir()
    try:
        infos = _convert_folder(paths, tmp, report)
        if entry is None:
            entry = _pick_model(infos)
            report(f"the files fit model {entry.id} ({entry.title})", 1.0)
        else:
            problems = _mismatches(entry, infos)
            if problems:
                raise WeightsError(f"{folder}: these are not weights of model {entry.id!r}: {'; '.join(problems)}. "
                                   "Nothing was imported")
        target = _install(entry.id, tmp, _manifest(entry.id, entry.compression, folder, infos))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(f"imported {entry.id} into {target}", 1.0)
    return entry


# -- user models -------------------------------------------------------------------------------------------------
def _edit_user_registry(change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Read, change and atomically rewrite the user registry, under a lock (concurrent ``add``s)."""
    from filelock import FileLock

    from .io.atomic import atomic_write_text

    path = user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        doc = read_user_registry(path)
        entries = change(list(doc["models"]))
        atomic_write_text(path, json.dumps({"schema_version": 1, "models": entries}, indent=2) + "\n")


def _check_new_id(model_id: str) -> None:
    pattern = schema()["$defs"]["model"]["properties"]["id"]["pattern"]
    if not isinstance(model_id, str) or not re.search(pattern, model_id):
        raise RegistryError(f"model id {model_id!r} is not allowed: use lower-case letters, digits, '.' and '-', "
                            f"starting with a letter or digit ({pattern})")
    if model_id in builtin_ids():
        raise RegistryError(f"{model_id!r} is a built-in model id: a user model cannot replace it; choose another id "
                            f"(to use files you downloaded for it: `meddiffusion models import FOLDER --as {model_id}`)")
    if any(isinstance(m, dict) and m.get("id") == model_id for m in read_user_registry()["models"]):
        raise RegistryError(f"a user model {model_id!r} is registered already; remove it first "
                            f"(`meddiffusion models remove {model_id}`)")


def _classes(indices: list[int], size: list[int], spacing: list[float]) -> list[dict[str, Any]]:
    names = class_names()
    out = []
    for i in indices:
        if i not in names:
            raise RegistryError(f"unknown class {i}; classes are " + ", ".join(f"{k} {v}" for k, v in names.items()))
        c = {"index": i, "name": names[i], "sizes": [{"image_xyz": list(size), "spacing_xyz": list(spacing)}]}
        if names[i][:2] in ("CT", "MR"):
            c["modality"] = names[i][:2]
        out.append(c)
    return out


def _hub_files(repo: str, revision: str | None) -> tuple[str, str]:
    """(autoencoder, BiFlowNet) file names of a hub repo, from its file list."""
    from huggingface_hub import HfApi

    if offline():
        raise WeightsError(f"offline: cannot list the files of {repo}; give them with --files AUTOENCODER BIFLOWNET")
    try:
        names = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).list_repo_files(repo, revision=revision)
    except Exception as exc:  # network, HTTP, unknown repo
        raise WeightsError(f"could not list the files of {repo} ({type(exc).__name__}: {str(exc)[:200]}); "
                           "give them with --files AUTOENCODER BIFLOWNET") from exc
    for ae_pat, bf_pat in ((r"(^|/)autoencoder\.safetensors$", r"(^|/)biflownet\.safetensors$"),
                           (r"(^|/)PatchVolume[^/]*\.ckpt$", r"(^|/)BiFlowNet[^/]*\.pt$")):
        ae = [n for n in names if re.search(ae_pat, n)]
        bf = [n for n in names if re.search(bf_pat, n)]
        if len(ae) == 1 and len(bf) == 1:
            return ae[0], bf[0]
    raise WeightsError(f"{repo} has no single autoencoder + BiFlowNet pair (autoencoder.safetensors + "
                       "biflownet.safetensors, or PatchVolume_*.ckpt + BiFlowNet_*.pt); give them with --files")


def add_user_model(model_id: str, *, weights: str | Path | None = None, repo: str | None = None,
                   title: str | None = None, description: str | None = None, license: str | None = None,
                   compression: str | int | None = None, revision: str | None = None,
                   files: tuple[str, str] | list[str] | None = None, classes: list[int] | None = None,
                   size: list[int] | None = None, spacing: list[float] | None = None,
                   progress: Progress | None = None) -> ModelEntry:
    """Register a model of the user's in the user registry (``MEDDIFFUSION_CACHE/registry.json``) and
    return its entry. Exactly one of:

    * ``weights=FOLDER``: its files are checked and imported (as :func:`import_weights`); compression,
      architecture, classes and checksums are read from them (``classes`` narrows the classes).
    * ``repo="owner/name"``: a Hugging Face repo, downloaded later (``models download``); needs
      ``compression`` ("8x"/"4x"); ``files`` = (autoencoder, BiFlowNet) names in the repo, listed
      from the hub when not given; ``classes`` defaults to all seven.

    ``size``/``spacing`` (default 256^3 at 1 mm) become each class's trained size. Built-in ids, ids
    in use and entries the schema refuses raise :class:`RegistryError`; nothing is registered then."""
    if (weights is None) == (repo is None):
        raise RegistryError("give either a weights folder or a hub repo for the new model")
    _check_new_id(model_id)
    size = [int(v) for v in size or (256, 256, 256)]
    spacing = [float(v) for v in spacing or (1.0, 1.0, 1.0)]
    raw: dict[str, Any] = {"id": model_id, "title": title or model_id, "license": license or "the model owner's"}
    tmp = None
    try:
        if weights is not None:
            report = _report(progress)
            folder = _check_folder(weights)
            paths = _one_pair(folder)
            tmp = _new_temp_dir()
            infos = _convert_folder(paths, tmp, report)
            ae, bf = infos["autoencoder"]["config"], infos["biflownet"]["config"]
            comp = int(ae["downsample"][0])
            if compression is not None and int(str(compression).rstrip("x")) != comp:
                raise RegistryError(f"the autoencoder in {folder} compresses {comp}x, not {compression}")
            known = list(range(min(int(bf["cond_classes"] or 1), len(class_names()))))
            indices = sorted(set(classes)) if classes else known
            if [i for i in indices if i not in known]:
                raise RegistryError(f"the BiFlowNet knows classes {known}, not {sorted(set(indices) - set(known))}")
            raw.update(description=description or f"user model imported from {folder.resolve()}",
                       compression=f"{comp}x", source={"kind": "local", "folder": str(folder.resolve())},
                       files=[{"role": r, "format": infos[r]["source_format"], "filename": infos[r]["source"],
                               "sha256": infos[r]["source_sha256"], "size": infos[r]["source_size"]} for r in ROLES],
                       architecture={"autoencoder": ae, "biflownet": bf})
        else:
            if compression is None:
                raise RegistryError("a hub model needs its compression: give --compression 8x or 4x")
            comp = int(str(compression).rstrip("x"))
            names = tuple(files) if files else _hub_files(str(repo), revision)
            if len(names) != 2:
                raise RegistryError("--files takes two names: the autoencoder's and the BiFlowNet's")
            indices = sorted(set(classes)) if classes else sorted(class_names())
            raw.update(description=description or f"user model from the Hugging Face repo {repo}",
                       compression=f"{comp}x", source={"kind": "hub", "repo_id": str(repo), "revision": revision or "main"},
                       files=[{"role": r, "format": "meddiffusion" if n.endswith(".safetensors") else "official",
                               "filename": n, "sha256": None, "size": None} for r, n in zip(ROLES, names)])
        step = 8 * comp
        if any(v % step for v in size):
            raise RegistryError(f"size {size} is not a multiple of {step} per axis (needed by a {comp}x model)")
        raw.update(classes=_classes(indices, size, spacing),
                   defaults={"class": indices[0], "sampler": "ddpm", "steps": 1000}, resources={})
        raw = {k: raw[k] for k in ("id", "title", "description", "license", "compression", "source", "classes",
                                   "files", "defaults", "architecture", "resources") if k in raw}
        problems = validate_model(raw)
        if problems:
            raise RegistryError(f"model {model_id!r} refused by the registry schema: {'; '.join(problems)}")
        if tmp is not None:
            _install(model_id, tmp, _manifest(model_id, comp, folder, infos))
        else:
            shutil.rmtree(imported_dir(model_id), ignore_errors=True)  # left by an earlier model of that id

        def append(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if any(isinstance(m, dict) and m.get("id") == model_id for m in entries):
                raise RegistryError(f"a user model {model_id!r} is registered already")
            return entries + [raw]

        try:
            _edit_user_registry(append)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(imported_dir(model_id), ignore_errors=True)
            raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return get_model(model_id)


def remove_imported(model_id: str) -> list[Path]:
    """Delete the imported files of ``model_id`` (any non-bundled model); the paths removed."""
    from filelock import FileLock

    target = imported_dir(model_id)
    if not target.exists():
        return []
    with FileLock(str(imports_root() / f".{model_id}.lock")):
        shutil.rmtree(target)
    return [target]


def remove_user_model(model_id: str, files: bool = False) -> list[Path]:
    """Remove a user model from the user registry; with ``files`` also its imported files and its
    hub downloads that no other model uses. Built-in ids raise :class:`RegistryError`. Returns the
    file paths deleted."""
    if model_id in builtin_ids():
        raise RegistryError(f"{model_id!r} is a built-in model: it cannot be removed (only user models can; to delete "
                            f"files imported for it: `meddiffusion models remove {model_id} --files`, "
                            f"remove_imported({model_id!r}))")
    removed: list[dict[str, Any]] = []

    def drop(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = [m for m in entries if not (isinstance(m, dict) and m.get("id") == model_id)]
        if len(keep) == len(entries):
            ids = [m.get("id") for m in entries if isinstance(m, dict)]
            raise RegistryError(f"no user model {model_id!r} (user models: {', '.join(map(str, ids)) or 'none'})")
        removed.extend(m for m in entries if isinstance(m, dict) and m.get("id") == model_id)
        return keep

    _edit_user_registry(drop)
    if not files:
        return []
    gone = remove_imported(model_id)
    for raw in removed:
        src = raw.get("source", {})
        if src.get("kind") != "hub":
            continue
        from huggingface_hub import try_to_load_from_cache

        in_use = {(m.source.get("repo_id"), f.get("filename")) for m in models() if m.source.get("kind") == "hub"
                  for f in m.files}
        for f in raw.get("files", []):
            if (src.get("repo_id"), f.get("filename")) in in_use:
                continue
            hit = try_to_load_from_cache(src["repo_id"], f["filename"], revision=f.get("revision") or src.get("revision"))
            if isinstance(hit, str) and Path(hit).exists():
                _remove_cached(Path(hit))
                gone.append(Path(hit))
    return gone


def weights_version(model_id: str) -> str | None:
    """A short tag of the files imported for ``model_id`` (changes with every import), ``None`` when
    none are: a service that keeps models loaded can add it to its cache key."""
    try:
        doc = json.loads((imported_dir(model_id) / MANIFEST).read_text())
        return hashlib.sha256(json.dumps(doc.get("files"), sort_keys=True).encode()).hexdigest()[:16]
    except (OSError, ValueError):
        return None
