"""Stand-ins for the Qt side of the Slicer panel (its .ui widgets and its timer), shared by the tests
that run the widget's code without Qt. Every ``self.ui.X`` the code touches must exist in the .ui."""
import xml.etree.ElementTree as ET

from conftest import ROOT

UI = ROOT / "MedDiffusion" / "Resources" / "UI" / "MedDiffusion.ui"
UI_NAMES = {w.get("name") for w in ET.parse(UI).iter("widget")}


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
