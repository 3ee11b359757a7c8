"""MedDiffusion: a Slicer-free PyTorch implementation of 3D MedDiffusion (Wang et al., IEEE TMI).

The package never imports ``slicer`` or ``qt``; the Slicer module is a thin layer on top.
"""

__version__ = "0.1.0"
