"""Ahead-of-time compiled noise networks: one AOTInductor package per network, weights, input
shapes, device and torch build, kept in the cache so that compilation is paid once.

Eager PyTorch spends most of a small model's step in per-operation overhead (the bundled
model's forward is ~1,500 small operations). ``torch.compile`` removes it, but costs 1-2 minutes
per process on a small CPU, every time. An AOTInductor package (``torch.export`` +
``torch._inductor.aoti_compile_and_package`` with frozen weights) is compiled once, loads in
milliseconds, and runs the same arithmetic to float32 rounding (~3e-6 on the bundled model).

``meddiffusion compile`` (and ``--compile`` on a run) builds the package for one latent shape;
a pipeline in fast mode then uses it automatically whenever the shape, weights, device and torch
build match. Packages are native code: they are only ever loaded from this cache, which only this
library writes (``$MEDDIFFUSION_CACHE/compiled``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..paths import compiled_dir

log = logging.getLogger(__name__)

NoiseArgs = Sequence[torch.Tensor]


def weights_digest(net: nn.Module) -> str:
    """sha256 of the network's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """sha256 of this library's network code: a package traced from other code is never used."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):  # the kernels package included
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def package_path(net: nn.Module, args: NoiseArgs, digest: str | None = None) -> Path:
    """Where the package for ``net`` called on ``args`` lives: the name says the network and the
    latent shape; the hash covers weights, network code, input shapes/dtypes, device, CPU
    capability and torch."""
    device = args[0].device
    what = {
        "network": type(net).__name__,
        "config": getattr(net, "config", None),
        "weights": digest or weights_digest(net),
        "code": _code_digest(),
        "inputs": [(tuple(a.shape), str(a.dtype)) for a in args],
        "device": device.type,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]
    shape = "x".join(map(str, args[0].shape))
    return compiled_dir() / f"{type(net).__name__.lower()}-{shape}-{device.type}-{key}.pt2"


def build(net: nn.Module, args: NoiseArgs, path: Path) -> float:
    """Export ``net(*args)`` and compile it into the AOTInductor package ``path`` (weights frozen
    as constants). Written under a temporary name and moved into place. Returns seconds taken."""
    import torch._inductor.config as inductor_config

    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".building-", suffix=".pt2")
    os.close(fd)
    try:
        with torch.no_grad():
            exported = torch.export.export(net, tuple(args))
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(exported, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.perf_counter() - t0


class PrecompiledNoise:
    """A loaded package, called like the network: ``(x, t, y, res) -> eps`` for the exact input
    shapes it was compiled for (anything else raises ``ValueError``)."""

    def __init__(self, path: Path, args: NoiseArgs):
        self.path = Path(path)
        self.shapes = [tuple(a.shape) for a in args]
        device_index = args[0].device.index if args[0].device.index is not None else -1
        # the C++ loader directly: ``torch._inductor.aoti_load_package`` would first import
        # torch._inductor / _dynamo / distributed (~3 s on a small CPU) for the same object
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, device_index)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if [tuple(a.shape) for a in args] != self.shapes:
            raise ValueError(f"{self.path.name} was compiled for inputs {self.shapes}")
        return self._loader.boxed_run(list(args))[0]


def find_or_build(net: nn.Module, args: NoiseArgs, build_missing: bool, digest: str | None = None
                  ) -> PrecompiledNoise | None:
    """The package for ``net(*args)``: loaded from the cache, built first when ``build_missing``.
    ``None`` when there is none (and none is to be built) or it cannot be built or loaded here
    (a warning says why; the caller runs the eager network)."""
    path = package_path(net, args, digest)
    try:
        if not path.is_file():
            if not build_missing:
                return None
            log.info("compiling %s for latents %s (one-time, 1-2 min on a small CPU) -> %s", type(net).__name__,
                     "x".join(map(str, args[0].shape)), path)
            secs = build(net, args, path)
            log.info("compiled in %.0f s", secs)
        return PrecompiledNoise(path, args)
    except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op or platform: eager still works
        warnings.warn(f"the compiled noise network is not usable here ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); running uncompiled",
                      RuntimeWarning, stacklevel=2)
        return None


__all__ = ["compiled_dir", "weights_digest", "package_path", "build", "PrecompiledNoise", "find_or_build"]
