"""End-to-end pipelines: class-conditional generation (and conditioned tasks)."""
from ..devices import resolve_device
from .generation import GenerationPipeline, legal_size

__all__ = ["GenerationPipeline", "legal_size", "resolve_device"]
