"""Networks: Patch-Volume autoencoder, BiFlowNet noise estimator, ControlNet."""
from .autoencoder import PatchVolumeAE
from .biflownet import BiFlowNet  # noqa: E402

__all__ = ["PatchVolumeAE", "BiFlowNet"]
