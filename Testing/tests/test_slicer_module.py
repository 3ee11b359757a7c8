"""Static checks of the Slicer module that need no Slicer application: what Slicer's process imports,
the .ui against the parameter node (the annotations Slicer's GUI connectors require), CMake lists,
metadata, sample data and the README."""
import ast
import hashlib
import re
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import ROOT

MODULE = ROOT / "MedDiffusion"
sys.path.insert(0, str(MODULE))
UI = MODULE / "Resources" / "UI" / "MedDiffusion.ui"


def _module_ast():
    return ast.parse((MODULE / "MedDiffusion.py").read_text())


def _class(tree, name):
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


# -- nothing heavy in Slicer's process ----------------------------------------------------------------------
FORBIDDEN = ("torch", "huggingface_hub", "safetensors", "nibabel", "SimpleITK", "einops")


def _imports(path):
    """Every module a file imports, at any depth (function bodies included), incl. import_module("x")."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            if node.module == "MedDiffusionLib":
                yield from (f"MedDiffusionLib.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            yield node.args[0].value


def test_no_module_file_imports_torch_hub_or_library_code_other_than_the_client():
    files = sorted(MODULE.rglob("*.py"))
    assert len(files) >= 5
    seen = set()
    for path in files:
        for name in _imports(path):
            seen.add(name)
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
            if top == "MedDiffusionLib":
                assert name == "MedDiffusionLib.client", f"{path.relative_to(ROOT)} imports {name}"
    assert "MedDiffusionLib.client" in seen  # the check looks at real imports


def test_the_static_import_check_catches_a_nested_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    if True:\n        from MedDiffusionLib.pipelines import generation\n"
                   "    import importlib; importlib.import_module('torch')\n")
    assert {"MedDiffusionLib.pipelines", "torch"} <= set(_imports(bad))


# -- .ui <-> parameter node, as Slicer's connectors see it ------------------------------------------------------
# Slicer v5.10.0 Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (v5.8.1 line numbers in brackets):
#   QCheckBoxToBoolConnector             :162-165 [:138]  QCheckBox  <-> bool
#   QSliderOrSpinBoxToIntConnector       :276-321 [:225-270] QSpinBox <-> int; without WithinRange or
#                                        Minimum+Maximum the limits become -2**31 .. 2**31-1 (:316, :321)
#   QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector :340-393 QDoubleSpinBox/ctkSliderWidget <-> float|int;
#                                        unbounded -> -inf..inf (:389, :393), ctkSliderWidget raises (:380);
#                                        Decimals sets the shown decimals (:365)
#   QComboBoxToStringableConnector       :418-431 [:355-368] QComboBox <-> str|int|float|bool; raises
#                                        "requires the Choice annotation" without Choice (:431)
#   QLineEditToStrConnector              :515-518  QLineEdit <-> str
#   ctkPathLineEditToPathConnector       :673-676  ctkPathLineEdit <-> pathlib.Path
#   qMRMLNodeComboBoxToNodeConnector     :745-760  qMRMLNodeComboBox <-> vtkMRML*Node; sets nodeTypes from the type
# and wrapper.py :194-211: every connector is created before any is connected, so one failure binds nothing.
def _param_types():
    """{name: (base type name, {annotation name: evaluated args}, default)} from the parameter node class."""
    tree = _module_ast()
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass

    def value(expr):
        return eval(compile(ast.Expression(expr), "<annotation>", "eval"), {"__builtins__": {}}, dict(consts))

    out = {}
    for stmt in _class(tree, "MedDiffusionParameterNode").body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        ann, annotations = stmt.annotation, {}
        if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
            base, *extras = ann.slice.elts
            for call in extras:
                annotations[call.func.id] = [value(a) for a in call.args]
        else:
            base = ann
        default = value(stmt.value) if stmt.value is not None else None
        out[stmt.target.id] = (base.id if isinstance(base, ast.Name) else ast.unparse(base), annotations, default)
    return out


def _ui_bound():
    """[(widget class, widget name, parameter name, {property: value})] for every SlicerParameterName."""
    rows = []
    for w in ET.parse(UI).iter("widget"):
        props = {}
        for p in w.findall("property"):
            child = next(iter(p))
            props[p.get("name")] = ([s.text for s in child] if child.tag == "stringlist" else child.text)
        if "SlicerParameterName" in props:
            rows.append((w.get("class"), w.get("name"), props["SlicerParameterName"], props))
    return rows


def _range(annotations):
    if "WithinRange" in annotations:
        return tuple(annotations["WithinRange"])
    if "Minimum" in annotations and "Maximum" in annotations:
        return annotations["Minimum"][0], annotations["Maximum"][0]
    return None


def check_binding(cls, name, param, props, types) -> list[str]:
    """Problems Slicer's connector would raise or cause for one bound widget (empty list = fine)."""
    if param not in types:
        return [f"{name}: no parameter {param!r}"]
    base, ann, default = types[param]
    problems = []
    if cls == "QCheckBox":
        if base != "bool":
            problems.append(f"{name}: QCheckBox needs bool, {param} is {base}")
    elif cls in ("QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"):
        wanted = ("int",) if cls == "QSpinBox" else ("float", "int")
        rng = _range(ann)
        if base not in wanted:
            problems.append(f"{name}: {cls} needs {' or '.join(wanted)}, {param} is {base}")
        elif rng is None:
            problems.append(f"{name}: {param} has no WithinRange/Minimum+Maximum: the spin box limits become unbounded")
        else:
            if not rng[0] <= default <= rng[1]:
                problems.append(f"{name}: default {default} outside {rng}")
            ui_rng = (float(props.get("minimum", "nan")), float(props.get("maximum", "nan")))
            if ui_rng != (float(rng[0]), float(rng[1])):
                problems.append(f"{name}: .ui range {ui_rng} differs from the annotation {rng}")
            if base == "float" and "Decimals" not in ann:
                problems.append(f"{name}: float {param} has no Decimals (QDoubleSpinBox shows 2)")
    elif cls in ("QComboBox", "ctkComboBox"):
        if base not in ("str", "int", "float", "bool"):
            problems.append(f"{name}: QComboBox needs a str/int/float/bool with Choice, {param} is {base}")
        elif "Choice" not in ann:
            problems.append(f"{name}: {param} has no Choice annotation (ComboBoxToStringableConnector raises)")
        elif default not in ann["Choice"][0]:
            problems.append(f"{name}: default {default!r} not among the choices")
    elif cls == "QLineEdit":
        if base != "str":
            problems.append(f"{name}: QLineEdit needs str, {param} is {base}")
    elif cls == "ctkPathLineEdit":
        if base not in ("pathlib.Path", "Path"):
            problems.append(f"{name}: ctkPathLineEdit needs pathlib.Path, {param} is {base}")
    elif cls == "qMRMLNodeComboBox":
        if not base.startswith("vtkMRML"):
            problems.append(f"{name}: qMRMLNodeComboBox needs a node type, {param} is {base}")
        elif props.get("nodeTypes") != [base]:
            problems.append(f"{name}: .ui nodeTypes {props.get('nodeTypes')} differ from {base} (the connector resets them)")
        elif props.get("showChildNodeTypes") != "false" and base == "vtkMRMLScalarVolumeNode":
            problems.append(f"{name}: lists label maps and vector volumes (showChildNodeTypes is not false)")
    else:
        problems.append(f"{name}: no Slicer connector handles {cls}")
    return problems


def test_every_bound_widget_has_the_annotations_slicers_connector_requires():
    types = _param_types()
    bound = _ui_bound()
    assert len(bound) >= 20
    problems = [p for cls, name, param, props in bound for p in check_binding(cls, name, param, props, types)]
    assert not problems, "\n".join(problems)
    # every bound parameter is bound once; unbound ones are set by code (model/class/ControlNet lists)
    params = [param for _, _, param, _ in bound]
    assert len(params) == len(set(params))
    assert set(types) - set(params) == {"modelId", "classIndex", "labelsControlNet", "sparseViewControlNet"}


def test_the_binding_check_reports_what_slicer_would_refuse():
    types = {"sampler": ("str", {}, "ddpm"), "steps": ("int", {}, 5), "size": ("float", {"WithinRange": [1, 9]}, 2.0)}
    assert "no Choice" in check_binding("QComboBox", "c", "sampler", {}, types)[0]
    assert "unbounded" in check_binding("QSpinBox", "s", "steps", {}, types)[0]
    assert any("Decimals" in p for p in check_binding("QDoubleSpinBox", "d", "size",
                                                      {"minimum": "1", "maximum": "9"}, types))


EXPECTED_CLASSES = {
    "Button": {"QPushButton"}, "CollapsibleButton": {"ctkCollapsibleButton"}, "ComboBox": {"QComboBox"},
    "Selector": {"qMRMLNodeComboBox"}, "SpinBox": {"QSpinBox", "QDoubleSpinBox"}, "Label": {"QLabel"},
    "CheckBox": {"QCheckBox"}, "LineEdit": {"QLineEdit", "ctkPathLineEdit"}, "ProgressBar": {"QProgressBar"},
    "Table": {"QTableWidget"},
}


def test_every_widget_used_in_python_exists_with_expected_class_and_every_control_has_a_tooltip():
    widgets = {w.get("name"): w for w in ET.parse(UI).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "MedDiffusion.py").read_text()))
    assert len(used) >= 30
    for name in sorted(used):
        assert name in widgets, f"{name} is used in MedDiffusion.py but missing from the .ui"
        suffix = "Label" if name.startswith("label_") else next(
            s for s in sorted(EXPECTED_CLASSES, key=len, reverse=True) if name.lower().endswith(s.lower()))
        assert widgets[name].get("class") in EXPECTED_CLASSES[suffix], (name, widgets[name].get("class"))
    controls = [n for n, w in widgets.items() if w.get("class") not in ("QWidget", "qMRMLWidget", "ctkCollapsibleButton")]
    untipped = [n for n in controls if not any(p.get("name") == "toolTip" for p in widgets[n].findall("property"))]
    assert not untipped, untipped


# -- packaging ------------------------------------------------------------------------------------------------
LISTS = ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES", "LIB_PYTHON_SCRIPTS", "LIB_PYTHON_RESOURCES")
GLOBS = {  # what each list globs (relative to the module folder / the repository root)
    "MODULE_PYTHON_SCRIPTS": '"${CMAKE_CURRENT_SOURCE_DIR}/*.py"',
    "MODULE_PYTHON_RESOURCES": '"${CMAKE_CURRENT_SOURCE_DIR}/Resources/*"',
    "LIB_PYTHON_SCRIPTS": '"${MEDDIFFUSION_ROOT}/MedDiffusionLib/*.py"',
    "LIB_PYTHON_RESOURCES": '"${MEDDIFFUSION_ROOT}/MedDiffusionLib/resources/*"',
}


def _cmake_file_lists(module_dir, tmp_path) -> dict[str, set[str]] | None:
    """Run the file-list block of MedDiffusion/CMakeLists.txt with ``cmake -P`` in ``module_dir``
    (script mode sets CMAKE_CURRENT_SOURCE_DIR to the working directory); None without cmake."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        return None
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(r"^# -- file lists: begin$.*^# -- file lists: end$", text, re.M | re.S).group(0)
    script = tmp_path / "lists.cmake"
    script.write_text(block + "\nforeach(v " + " ".join(LISTS) + ")\n  message(\"${v}=${${v}}\")\nendforeach()\n")
    out = subprocess.run([cmake, "-P", str(script)], cwd=module_dir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lists = dict(line.split("=", 1) for line in out.stderr.splitlines() if "=" in line)
    return {k: set(filter(None, lists[k].split(";"))) for k in LISTS}


def _tree_files(folder, relative_to) -> set[str]:
    return {p.relative_to(relative_to).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}


def test_cmake_lists_every_module_and_library_file(tmp_path):
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for name, pattern in GLOBS.items():  # globbed, relative paths (what ctkMacroCompilePythonScript expects)
        assert re.search(rf"file\(GLOB_RECURSE {name} LIST_DIRECTORIES false [^\n]*\n\s+RELATIVE [^\n]*"
                         + re.escape(pattern), cmake), name
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in cmake and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in cmake
    assert 'SCRIPTS "${LIB_PYTHON_SCRIPTS}"' in cmake and 'RESOURCES "${LIB_PYTHON_RESOURCES}"' in cmake
    assert "SOURCE_DIR ${MEDDIFFUSION_ROOT}" in cmake

    lists = _cmake_file_lists(MODULE, tmp_path)
    if lists is not None:  # what CMake itself lists in this checkout: every file, nothing else
        module = _tree_files(MODULE, MODULE) - {"CMakeLists.txt"}
        lib = _tree_files(ROOT / "MedDiffusionLib", ROOT)
        assert lists["MODULE_PYTHON_SCRIPTS"] | lists["MODULE_PYTHON_RESOURCES"] == module
        assert lists["LIB_PYTHON_SCRIPTS"] == {p for p in lib if p.endswith(".py")}
        assert lists["LIB_PYTHON_RESOURCES"] == {p for p in lib if not p.endswith(".py")}
        assert {"MedDiffusionLib/io/atomic.py", "MedDiffusionLib/schedulers/samplers.py",
                "MedDiffusionLib/resources/models/chest-ct-mini/biflownet.safetensors"} <= lib

        # a file added later (e.g. a new library module) is packaged; caches and hidden files are not
        fake = tmp_path / "repo"
        (fake / "MedDiffusion" / "Resources" / "UI").mkdir(parents=True)
        for rel in ("MedDiffusion/MedDiffusion.py", "MedDiffusion/Resources/UI/MedDiffusion.ui",
                    "MedDiffusion/__pycache__/MedDiffusion.cpython-312.pyc", "MedDiffusionLib/__init__.py",
                    "MedDiffusionLib/models/streaming_decode.py", "MedDiffusionLib/models/__pycache__/x.pyc",
                    "MedDiffusionLib/resources/models/new/model.json", "MedDiffusionLib/resources/.DS_Store",
                    "MedDiffusionLib/.hidden/x.py"):
            (fake / rel).parent.mkdir(parents=True, exist_ok=True)
            (fake / rel).write_text("")
        got = _cmake_file_lists(fake / "MedDiffusion", tmp_path)
        assert got == {"MODULE_PYTHON_SCRIPTS": {"MedDiffusion.py"},
                       "MODULE_PYTHON_RESOURCES": {"Resources/UI/MedDiffusion.ui"},
                       "LIB_PYTHON_SCRIPTS": {"MedDiffusionLib/__init__.py", "MedDiffusionLib/models/streaming_decode.py"},
                       "LIB_PYTHON_RESOURCES": {"MedDiffusionLib/resources/models/new/model.json"}}
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "add_subdirectory(MedDiffusion)"):
        assert key in top
    assert 'set(EXTENSION_CATEGORY "Image Synthesis")' in top
    assert '_("Image Synthesis")' in (MODULE / "MedDiffusion.py").read_text()
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake


def test_licence_file_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 9000


def test_requirements_exclude_torch_and_match_pyproject():
    from MedDiffusionGlue import dependencies
    reqs = dependencies.read_requirements()
    names = {dependencies.split_requirement(r)[0].lower() for r in reqs}
    assert "torch" not in names
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    wanted = {name.lower() for name in re.findall(r'"([A-Za-z0-9_.\-]+)[^"]*"', deps)}
    assert names == wanted - {"torch"}
    assert f'"torch{dependencies.TORCH_REQUIREMENT},' in pyproject


def test_sample_data_files_match_their_registered_checksums(tmp_path):
    src = (MODULE / "MedDiffusion.py").read_text()
    entries = re.findall(r'SAMPLE_\w+ = \("([^"]+)", "SHA256:([0-9a-f]{64})"\)', src)
    assert len(entries) == 2
    for name, digest in entries:
        path = MODULE / "Resources" / "SampleData" / name
        assert path.stat().st_size < 1_500_000
        # SampleData fetches registered URIs with urllib.request.urlretrieve, then checks the SHA256
        # (Slicer v5.10.0 Modules/Scripted/SampleData/SampleData.py:1098, :1106)
        fetched, _ = urllib.request.urlretrieve(path.as_uri(), tmp_path / name)
        assert hashlib.sha256(open(fetched, "rb").read()).hexdigest() == digest, name


def test_icon_is_128_png():
    data = (MODULE / "Resources" / "Icons" / "MedDiffusion.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 128 and int.from_bytes(data[20:24], "big") == 128


def test_every_panel_action_maps_to_a_logic_method_in_the_readme():
    tree = _module_ast()
    widget = _class(tree, "MedDiffusionWidget")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## 3D Slicer extension", 1)[1].split("\n## ", 1)[0]
    called = {n.func.attr for h in widget.body if isinstance(h, ast.FunctionDef) and h.name.startswith("_on")
              for n in ast.walk(h) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and getattr(n.func.value, "attr", "") == "logic"}
    assert {"submitGenerate", "submitSynthesize", "submitSimulate", "submitReconstruct", "cancel", "startUnload"} <= called
    for method in ("generate", "synthesizeFromSegmentation", "simulateSparseView", "reconstructSparseView",
                   "submitGenerate", "poll", "finishJob", "cancel", "unload", "useRemoteServer"):
        assert f"logic.{method}(" in section, f"README has no console example of logic.{method}"
    assert "Slicer ≥ 5.10" in section


@pytest.mark.parametrize("req,version,ok", [(">=2.6", "2.13.0+cu128", True), (">=2.6", "2.5.1", False),
                                            (">=1.24,<3", "2.1.0", True), (">=1.24,<3", "3.0", False),
                                            (">=0.0.9,<1", "0.0.20", True), (">=2.6", None, False)])
def test_version_requirements(req, version, ok):
    from MedDiffusionGlue import dependencies
    assert dependencies.satisfies(version, req) is ok


def test_missing_dependencies_are_found_without_importing(tmp_path):
    from MedDiffusionGlue import dependencies
    reqs = ["numpy>=1.24", "surely-not-installed-pkg>=1"]
    assert dependencies.installed_versions(["numpy"])["numpy"]
    here = [r for r in dependencies.missing(None, reqs) if not r.startswith("torch")]
    assert here == ["surely-not-installed-pkg>=1"]
    other = tmp_path / "python"  # another interpreter is asked in a subprocess
    other.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    other.chmod(0o755)
    assert dependencies.missing(str(other), reqs) == here
    cmd = dependencies.pip_command("/py", ["torch>=2.6", "numpy>=1.24"])
    assert cmd[:3] == ["/py", "-m", "pip"] and "torch>=2.6" not in cmd and "numpy>=1.24" in cmd


def test_service_errors_use_the_panels_words():
    from MedDiffusionGlue.service import panel_message
    msg = panel_message("hu_window: this model has no suggested HU window for that class; give one")
    assert msg == "Map CT to HU: this model has no suggested HU window for that class; give one"
    assert panel_message("steps: the number of sampler steps must be positive, got 0").startswith("Steps: the number")
    assert panel_message("unknown: x") == "unknown: x"  # not a field of the panel: left as it is
    assert "--weights" not in panel_message("size and spacing are required with --weights FOLDER")
    assert panel_message(None) == "unknown error"


def test_a_broken_torch_cannot_break_the_dependency_check(tmp_path):
    """The panel checks packages by metadata, never by importing: a torch that raises on import (a
    Windows DLL error is an OSError) is reported by version, and an old one as missing."""
    from MedDiffusionGlue import dependencies
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise OSError('[WinError 126] fbgemm.dll not found')\n")
    dist = site / "torch-2.7.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.7.1\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    assert dependencies.installed_versions(["torch"], str(python)) == {"torch": "2.7.1"}
    assert "torch>=2.6" not in dependencies.missing(str(python), [])
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.0\n")
    assert "torch>=2.6" in dependencies.missing(str(python), [])


# -- nothing the panel calls waits on the network or a child process ------------------------------------------
# (the stepwise forms are tested against a real service in test_slicer_transfers.py / test_slicer_service.py)
BLOCKING_LOGIC = {"connect", "health", "client", "missingDependencies", "unload", "waitJob", "generate",
                  "synthesizeFromSegmentation", "simulateSparseView", "reconstructSparseView", "startServer", "reproduce",
                  "evaluate"}


def _calls(node):
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]


def test_the_panel_and_the_job_steps_use_only_stepwise_requests():
    widget = _class(_module_ast(), "MedDiffusionWidget")
    on_logic = {c.func.attr for c in _calls(widget) if getattr(c.func.value, "attr", "") == "logic"}
    assert {"poll", "connectStep", "startDependencyCheck", "startUnload", "cancel"} <= on_logic
    assert not on_logic & BLOCKING_LOGIC, on_logic & BLOCKING_LOGIC
    for path in MODULE.rglob("*.py"):  # the blocking waits of LocalServer and the package probe are never used
        names = {c.func.attr for c in _calls(ast.parse(path.read_text()))}
        assert not names & {"ensure", "wait_ready", "ready", "installed_versions", "run"}, path
    service = ast.parse((MODULE / "MedDiffusionGlue" / "service.py").read_text())
    logic = _class(service, "ServiceLogic")
    on_client = {(m.name, c.func.attr) for m in logic.body if isinstance(m, ast.FunctionDef) for c in _calls(m)
                 if isinstance(c.func.value, ast.Call) and getattr(c.func.value.func, "attr", "") == "client"}
    assert ("poll", "start_status") not in on_client  # poll goes through the _step* helpers
    assert {name for _m, name in on_client if not name.startswith("start_")} == {"unload"}  # console-only
    assert {("_stepService", "start_status"), ("_stepDownloads", "start_download"), ("_submit", "start_submit"),
            ("connectStep", "start_health"), ("cancel", "start_cancel")} <= on_client


def test_run_on_python_url_and_token_are_application_settings_not_scene_parameters():
    tree = _module_ast()
    fields = {n.target.id for n in _class(tree, "MedDiffusionParameterNode").body if isinstance(n, ast.AnnAssign)}
    assert not fields & {"runOn", "python", "serverUrl", "serverToken", "serverCaFile"}
    bound = {row[1] for row in _ui_bound()}
    assert not bound & {"runOnComboBox", "pythonPathLineEdit", "serverUrlLineEdit", "serverTokenLineEdit",
                        "serverCaFilePathLineEdit"}
    widget = _class(tree, "MedDiffusionWidget")
    for method, call in (("_loadSettings", "value"), ("_saveSettings", "setValue")):
        body = next(m for m in widget.body if isinstance(m, ast.FunctionDef) and m.name == method)
        keys = {c.args[0].right.value for c in _calls(body) if c.func.attr == call and isinstance(c.args[0], ast.BinOp)}
        assert keys == {"runOn", "python", "serverUrl", "serverToken", "serverCaFile"}, (method, keys)
    readme = (ROOT / "README.md").read_text().split("## 3D Slicer extension", 1)[1].split("\n## ", 1)[0]
    assert "token is stored there in plain" in readme.replace("\n", " ").replace("**", "")


def test_a_picked_pythons_packages_are_checked_in_the_servers_environment(tmp_path, monkeypatch):
    """The check runs the picked Python as the local server will: with the environment given
    (``None`` removes a variable Slicer's launcher set), in a child process polled without waiting."""
    from MedDiffusionGlue import dependencies
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ -n "$LAUNCHER_ONLY" ]; then echo "launcher variable seen" >&2; exit 3; fi\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("LAUNCHER_ONLY", "1")
    check = dependencies.DependencyCheck(str(python), ["numpy>=1.24", "surely-not-installed-pkg>=1"],
                                         env={"LAUNCHER_ONLY": None})
    assert check.process is not None  # a child process, polled
    check.wait()
    assert check.error is None and "surely-not-installed-pkg>=1" in check.missing and check.versions["numpy"]
    polluted = dependencies.DependencyCheck(str(python), ["numpy>=1.24"]).wait()
    assert polluted.missing is None and "launcher variable seen" in polluted.error


def _method(cls, name):
    return next(m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == name)


def _ui_attrs(node) -> set[str]:
    """The ``self.ui.NAME`` widgets a piece of code uses."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "ui" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


def test_the_server_settings_have_a_ca_file_chooser_shown_and_applied_with_the_url_and_token():
    """Run on: Server has a CA file (ctkPathLineEdit, files) in the server fields' form rows, shown and hidden
    with them, passed to useRemoteServer(url, token, caFile) and applied when a path is finished, not per
    keystroke (currentPathChanged fires for every character typed)."""
    root = ET.parse(UI).getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    props = lambda name: {p.get("name"): next(iter(p)).text for p in widgets[name].findall("property")}  # noqa: E731
    edit = props("serverCaFilePathLineEdit")
    assert widgets["serverCaFilePathLineEdit"].get("class") == "ctkPathLineEdit"
    assert edit["filters"] == "ctkPathLineEdit::Files"
    assert edit["toolTip"] == ("Certificate authority (PEM) to trust for an https:// server: the lab's CA or the "
                               "server's self-signed certificate. Empty: the system's trusted CAs.")
    assert "nameFilters" not in edit  # CTK turns name filters into a validator: any file name must do
    assert widgets["label_serverCaFilePathLineEdit"].get("class") == "QLabel"
    assert props("label_serverCaFilePathLineEdit")["text"] == "CA file:"
    assert "ctkPathLineEdit" in {c.findtext("class") for c in root.iter("customwidget")}
    # the label and the field share a row of the Run on form, right after the token; the rows stay unique
    form = next(lay for lay in root.iter("layout") if lay.get("name") == "runOnCollapsibleButtonLayout")
    cells = {item.find("widget").get("name"): (int(item.get("row")), int(item.get("column")))
             for item in form.findall("item") if item.find("widget") is not None}
    token_row = cells["serverTokenLineEdit"][0]
    assert cells["label_serverCaFilePathLineEdit"] == (token_row + 1, 0)
    assert cells["serverCaFilePathLineEdit"] == (token_row + 1, 1)
    assert len(set(cells.values())) == len(cells)

    widget = _class(_module_ast(), "MedDiffusionWidget")
    shown = [n for n in ast.walk(_method(widget, "_onRunOnChanged")) if isinstance(n, ast.For)]
    server_fields = next(_ui_attrs(f.iter) for f in shown if "serverUrlLineEdit" in _ui_attrs(f.iter))
    assert server_fields == {"serverUrlLineEdit", "label_serverUrlLineEdit", "serverTokenLineEdit",
                             "label_serverTokenLineEdit", "serverCaFilePathLineEdit", "label_serverCaFilePathLineEdit"}
    remote = [c for c in _calls(_method(widget, "_applyConnection")) if c.func.attr == "useRemoteServer"]
    assert len(remote) == 1 and len(remote[0].args) == 3 and ast.unparse(remote[0].args[2]) == "self._caFile()"
    ca_file = ast.unparse(_method(widget, "_caFile"))
    assert "serverCaFilePathLineEdit.currentPath.strip() or None" in ca_file  # an empty field: None
    # both path fields go through _connectPathEdited; nothing connects their per-keystroke signal to a slot
    setup = _method(widget, "setup")
    edited = {ast.unparse(c.args[0]) for c in _calls(setup) if c.func.attr == "_connectPathEdited"}
    assert edited == {"ui.pythonPathLineEdit", "ui.serverCaFilePathLineEdit"}
    assert not [c for c in _calls(setup) if c.func.attr == "connect" and c.args
                and getattr(c.args[0], "value", None) == "currentPathChanged(QString)"]
    helper = ast.unparse(_method(widget, "_connectPathEdited"))
    assert "comboBox().lineEdit()" in helper and "'editingFinished()'" in helper and "lineEdit.modified" in helper


def test_closing_the_scene_or_quitting_cancels_jobs():
    """Issue 19 item 3: the scene's StartCloseEvent reaches the logic's onSceneClosing (unfinished
    jobs are cancelled and add nothing), and cleanup (quit, reload) deletes a remote job."""
    import ast

    tree = ast.parse((ROOT / "MedDiffusion" / "MedDiffusion.py").read_text())
    methods = {f.name: f for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "MedDiffusionWidget"
               for f in c.body if isinstance(f, ast.FunctionDef)}
    close = ast.unparse(methods["onSceneStartClose"])
    assert "self.logic.onSceneClosing()" in close
    assert close.index("onSceneClosing") < close.index("setParameterNode")
    cleanup = ast.unparse(methods["cleanup"])
    assert "self.logic.cancel(self._job)" in cleanup and "self.logic.poll(self._job)" in cleanup


def test_a_python_path_that_does_not_exist_is_refused_not_applied():
    """Issue 19 item 2: the Python path applies when editing finishes and the path exists."""
    tree = _module_ast()
    widget = _class(tree, "MedDiffusionWidget")
    apply = ast.unparse(next(m for m in widget.body if isinstance(m, ast.FunctionDef) and m.name == "_applyConnection"))
    assert "os.path.isfile(python)" in apply and "raise InputError" in apply
    assert apply.index("isfile") < apply.index("useLocalServer")
    edited = ast.unparse(next(m for m in widget.body if isinstance(m, ast.FunctionDef)
                              and m.name == "_onConnectionEdited"))
    assert edited.index("self._applyConnection()") < edited.index("self._appliedConnection = settings")
