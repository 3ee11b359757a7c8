"""Stand-ins for the Qt side of the Slicer panel (its .ui widgets, its timer, Slicer's widget base
classes), shared by the tests that run the widget's code without Qt, and the real MRML they use
(slicer-core). Every ``self.ui.X`` the code touches must exist in the .ui."""
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

MODULE = ROOT / "MedDiffusion"
UI = MODULE / "Resources" / "UI" / "MedDiffusion.ui"
UI_NAMES = {w.get("name") for w in ET.parse(UI).iter("widget")}
sys.path.insert(0, str(MODULE))

if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer as mrml  # the test extra installs slicer-core here
else:
    mrml = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")


class StandInBase:
    """Slicer's ScriptedLoadableModuleWidget: nothing to set up here."""

    def __init__(self, *args, **kwargs):
        pass


class StandInMixin:
    """Slicer's VTKObservationMixin (the widget's second base class)."""

    def __init__(self, *args, **kwargs):
        pass


class FakeWidget:
    def __init__(self, name):
        self.name, self.enabled, self.visible, self.text, self.toolTip = name, True, True, "", ""
        self.currentIndex, self.range, self.value, self.currentPath = 0, (0, 1), 0, ""

    def setRange(self, lo, hi):
        self.range = (lo, hi)

    def setValue(self, v):
        self.value = v

    def blockSignals(self, b):
        return False


class FakeUI:
    """``self.ui``: a :class:`FakeWidget` (or the class ``KINDS`` names) per widget of the .ui."""

    KINDS: dict = {}

    def __init__(self):
        self._w = {}

    def __getattr__(self, name):
        assert name in UI_NAMES, f"self.ui.{name} is not in the .ui"
        return self._w.setdefault(name, self.KINDS.get(name, FakeWidget)(name))


class FakeTimer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False
