"""Offline evaluation (``meddiffusion evaluate``): paired metrics of a prediction against its
reference (:mod:`.paired`), distribution metrics of a generated set against a real one
(:mod:`.sets`: FRD, MMD, MS-SSIM diversity, Fréchet distance on a user-supplied feature network),
and the report they return (:mod:`.report`: rows, JSON, CSV). No module here downloads anything.
"""
from __future__ import annotations

from .features import (ResNet10Features, feature_networks, frechet_distance, load_feature_network,
                       register_feature_network)
from .paired import PAPER_WINDOW, STANDARD_WINDOWS, describe_grid, paired_metrics, resample_onto, same_grid
from .report import EvaluationReport, Row, check_report_path
from .sets import DEFAULT_GRID, MAX_MS_SSIM_PAIRS, MAX_SET_FILES, MAX_SET_VOXELS, SET_METRICS, set_metrics

__all__ = ["paired_metrics", "set_metrics", "EvaluationReport", "Row", "check_report_path", "frechet_distance",
           "register_feature_network", "feature_networks", "load_feature_network", "ResNet10Features",
           "PAPER_WINDOW", "STANDARD_WINDOWS", "DEFAULT_GRID", "MAX_SET_FILES", "MAX_SET_VOXELS",
           "MAX_MS_SSIM_PAIRS", "SET_METRICS", "describe_grid", "same_grid", "resample_onto"]
