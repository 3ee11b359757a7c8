"""End-to-end pipelines: class-conditional generation (and conditioned tasks)."""
from .generation import GenerationPipeline, legal_size, resolve_device

__all__ = ["GenerationPipeline", "legal_size", "resolve_device"]
