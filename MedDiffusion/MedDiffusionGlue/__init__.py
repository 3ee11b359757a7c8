"""Slicer-side glue of the MedDiffusion module: MRML geometry conversions and the worker thread.

Nothing here imports Qt; the geometry functions take the scene and nodes explicitly, so they run
under pytest with the ``slicer-core`` wheel (real MRML, no application).
"""
