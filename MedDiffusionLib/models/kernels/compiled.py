"""``torch.compile`` that falls back to eager execution where compiling is impossible
(:class:`CompiledOrEager`)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def _compile_failures() -> tuple[type[BaseException], ...]:
    """Exception types that mean "torch.compile cannot compile this here" (not errors of the run)."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "Unsupported"), (dynamo_exc, "InvalidBackend"),
             (dynamo_exc, "InternalTorchDynamoError"), (inductor_exc, "InductorError"),
             (inductor_exc, "CppCompileError"), (inductor_exc, "InvalidCxxCompiler"), (inductor_exc, "OperatorIssue")]
    return tuple(getattr(mod, name) for mod, name in names if isinstance(getattr(mod, name, None), type))


class CompiledOrEager:
    """``torch.compile(module)`` (static shapes; weights frozen as constants, which lets inductor
    pre-pack convolutions and fold the conditioning MLPs). If compiling is impossible here (no C++
    compiler, unsupported platform or Python) the first call warns once and every call runs the
    eager module, so a run never fails because of compilation. Only compilation failures are caught:
    an error of the run itself (out of memory, a shape error, cancellation) propagates and leaves
    compilation on. Inference only."""

    def __init__(self, module: nn.Module, backend: str = "inductor"):
        self.module = module
        self.compiled: Any = None
        self.error: str | None = None
        try:
            self.compiled = torch.compile(module, dynamic=False, backend=backend)
        except Exception as exc:  # noqa: BLE001 - torch.compile unsupported on this platform / Python
            self._give_up(exc)

    @staticmethod
    def _freezing():
        """Inductor's ``freezing`` switch for this call only (``torch.compile(options=...)`` does not
        reach it); compilation happens lazily inside the call, and again on a new input shape."""
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)

    def _give_up(self, exc: BaseException) -> None:
        self.compiled = None
        self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(f"torch.compile is not usable here ({self.error[:300]}); running uncompiled",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                with self._freezing():
                    return self.compiled(*args, **kwargs)
            except _compile_failures() as exc:  # compile-time failure surfaces at the first call
                self._give_up(exc)
        return self.module(*args, **kwargs)
