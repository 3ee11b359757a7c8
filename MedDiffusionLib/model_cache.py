"""Pipelines kept loaded between jobs (:class:`ModelCache`): keyed by what they were built from, least
recently used dropped first."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .controlnets import find_controlnet, resolve_controlnet
from .defaults import show
from .errors import SetupError

if TYPE_CHECKING:
    from .jobspec import JobSpec


class ModelCache:
    """Pipelines kept between jobs, keyed by what they were built from, at most ``max_pipelines``
    of them: using a key makes it the most recently used; loading one more than that drops the
    least recently used first (and gives its memory back, as :meth:`clear` does), so no more than
    ``max_pipelines`` are ever held. ``loads`` counts weight loads. ``local_paths=False`` (the job
    service) opens ControlNets by name only, never a path a request names."""

    def __init__(self, max_pipelines: int = 2, local_paths: bool = True) -> None:
        if int(max_pipelines) < 1:
            raise ValueError(f"max_pipelines must be at least 1, got {max_pipelines}")
        self.max_pipelines = int(max_pipelines)
        self.local_paths = bool(local_paths)
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0

    def keys(self) -> list[str]:
        return [":".join(str(k) for k in key if k is not None) for key in self._pipes]

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        if len(self._pipes) >= self.max_pipelines:
            # drop the least recently used before loading, so at most max_pipelines are ever held
            while len(self._pipes) >= self.max_pipelines:
                self._pipes.popitem(last=False)
            self._release_memory()
        self.loads += 1
        pipe = load()
        self._pipes[key] = pipe
        return pipe

    def generation(self, spec: JobSpec, device: str) -> Any:
        from .pipelines.generation import GenerationPipeline

        p = spec.params
        key = ("generate", spec.model, spec.weights, device, p["mode"], p["precision"], p["compile"])
        pipe = self._get(key, lambda: GenerationPipeline.from_pretrained(spec.model, spec.weights, device=device,
                                                                         precision=p["precision"], mode=p["mode"],
                                                                         compile=p["compile"]))
        return pipe

    def controlled(self, spec: JobSpec, device: str,
                   controlnet_dirs: Sequence[str | Path] | None = None) -> Any:
        """The pipeline of ``spec``'s ControlNet: a name found in ``controlnet_dirs`` (default: the
        bundled ones), else (``local_paths`` only) a file or run folder. A name that was there when
        the request was resolved but is gone now is a :class:`SetupError` about ``controlnet``."""
        from .pipelines.conditioned import ControlledPipeline

        p = spec.params
        path = find_controlnet(spec.controlnet, controlnet_dirs)
        if path is None and not self.local_paths:
            raise SetupError(f"the ControlNet {show(spec.controlnet)} is not installed here any more",
                             field="controlnet")
        if path is None:
            path = resolve_controlnet(spec.controlnet, controlnet_dirs)
        key = ("controlnet", spec.controlnet, spec.model, spec.weights, device, p["mode"], p["precision"])
        pipe = self._get(key, lambda: ControlledPipeline.from_files(
            path, spec.model, spec.weights, device=device, mode=p["mode"], precision=p["precision"]))
        return pipe

    def clear(self) -> list[str]:
        """Drop every pipeline and give cached GPU memory back to the driver."""
        names = self.keys()
        self._pipes.clear()
        self._release_memory()
        return names

    @staticmethod
    def _release_memory() -> None:
        """``gc.collect()`` and, with CUDA, hand the allocator's cached blocks back to the driver."""
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
