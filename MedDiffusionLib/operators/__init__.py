"""Imaging operators used to build conditions: fan-beam CT (sparse view) and k-space under-sampling (MRI)."""
from .fanbeam import FanBeamGeometry, FanBeamOperator, attenuation_to_hu, hu_to_attenuation
from .mri import gaussian_column_mask, poisson_disc_mask, zero_filled_recon

__all__ = ["FanBeamGeometry", "FanBeamOperator", "attenuation_to_hu", "hu_to_attenuation", "gaussian_column_mask",
           "poisson_disc_mask", "zero_filled_recon"]
