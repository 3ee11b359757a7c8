"""Layout rules: the library never imports slicer or qt."""
import ast

from conftest import ROOT


def test_library_never_imports_slicer_or_qt():
    offenders = []
    for path in (ROOT / "MedDiffusionLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"slicer", "qt", "ctk", "vtk", "PythonQt"}]
    assert not offenders, offenders
