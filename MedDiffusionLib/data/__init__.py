"""Volumes on disk and in memory: reading/writing with geometry, orientation, intensity maps."""
