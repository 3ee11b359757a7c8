"""No long main-thread step in submit and download (issue 19, item 7): a 512x512x300 int16 CT-like
volume node (real MRML from the slicer-core wheel) goes to a real local job service
(``simulate-sparse-view``, 4 views, 32 bins) and back, driven by ``logic.poll`` as the panel's
timer does; every main-thread call (the submit and each poll) is timed.

The issue's target is 100 ms per step. This machine is shared (2 cores, other jobs), so the test
asserts that at least 95 % of the calls take under 100 ms, and every call under :data:`BUDGET_S`, a bound that the one-go code failed by far (writing the input with gzip
took about 2.5 s, loading the result with the storage node about 0.6 s) and prints the measured
longest steps (``pytest -s``)."""
import gzip
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "MedDiffusion"))

if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer  # the test extra installs slicer-core here: a missing wheel must fail, not skip
else:  # no slicer-core wheel exists for this platform/Python
    slicer = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from MedDiffusionGlue import nodes  # noqa: E402
from MedDiffusionGlue.service import ServiceLogic  # noqa: E402

BUDGET_S = 0.4  # per main-thread call, always; the goal is 0.1 s (see the module docstring)
GOAL_S = 0.1  # ... which at least 95 % of the calls meet even on a loaded machine
SHAPE = (512, 512, 300)  # i, j, k
VIEWS, BINS = 4, 32


def ct_like(scene, shape=SHAPE, name="big CT"):
    """A CT-like int16 volume in HU (air, a body of soft tissue with noise, two lungs, a spine) with
    square axial pixels, an oblique direction and an origin that is not zero."""
    ni, nj, nk = shape
    x = (np.arange(ni, dtype=np.float32) - ni / 2) / (ni / 2)
    y = (np.arange(nj, dtype=np.float32) - nj / 2) / (nj / 2)
    xx, yy = np.meshgrid(x, y, indexing="xy")  # (j, i)
    plane = np.full((nj, ni), -1000, np.int16)
    plane[(xx / 0.85) ** 2 + (yy / 0.6) ** 2 < 1] = 40
    plane[((np.abs(xx) - 0.38) / 0.3) ** 2 + (yy / 0.4) ** 2 < 1] = -820
    plane[xx ** 2 + (yy - 0.4) ** 2 < 0.01] = 700
    rng = np.random.default_rng(0)
    arr = np.empty((nk, nj, ni), np.int16)  # VTK order: i fastest
    for k in range(nk):
        arr[k] = plane + rng.integers(-20, 21, plane.shape, dtype=np.int16) + np.int16(k % 7)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(ni, nj, nk)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.75, 0.75, 1.25)
    node.SetOrigin(-190.0, 185.5, -402.25)
    m = vtk.vtkMatrix4x4()
    c, s = np.cos(0.2), np.sin(0.2)
    for r, row in enumerate(((-c, -s, 0), (s, -c, 0), (0, 0, 1))):
        for col, v in enumerate(row):
            m.SetElement(r, col, v)
    node.SetIJKToRASDirectionMatrix(m)
    return node


def voxels(node):
    """(i, j, k) array of a volume node's voxels."""
    dims = node.GetImageData().GetDimensions()
    flat = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    return flat.reshape(dims[::-1]).transpose(2, 1, 0)


def ijk_to_ras(node):
    return np.array(nodes.geometry(node)[0])


@pytest.fixture(scope="module")
def local():
    scene = slicer.vtkMRMLScene()
    lg = ServiceLogic(scene)
    lg.useLocalServer(sys.executable)
    lg.startServer(wait=True, timeout=120)
    yield lg
    lg.stopServer()


@pytest.fixture(scope="module")
def ct(local):
    return ct_like(local.scene)


@pytest.fixture(scope="module")
def expected(ct):
    """What simulate_sparse_view gives in this process for the node's voxels and geometry."""
    from MedDiffusionLib.data.volumes import Volume
    from MedDiffusionLib.pipelines.conditioned import simulate_sparse_view

    return simulate_sparse_view(Volume(voxels(ct).astype(np.float32), ijk_to_ras(ct)), views=VIEWS, bins=BINS)


def run_timed(logic, ct):
    """Submit and poll to the end as the panel does; (result node, {phase: longest call in s})."""
    longest, durations = {}, []

    def timed(phase, call):
        t = time.perf_counter()
        out = call()
        durations.append(time.perf_counter() - t)
        longest[phase] = max(longest.get(phase, 0.0), durations[-1])
        return out

    job = timed("submit", lambda: logic.submitSimulate(ct, views=VIEWS, bins=BINS))
    deadline = time.monotonic() + 300
    while not job.done:
        phase = job.phase
        timed(phase, lambda: logic.poll(job))
        if job.phase == "service" and job.transfer is None:
            time.sleep(0.05)
        else:
            time.sleep(0.002)  # the panel's timer gives the event loop a turn between steps
        assert time.monotonic() < deadline, f"the job did not finish: {job.status}"
    (node,) = logic.finishJob(job)
    longest["share over 0.1 s"] = sum(d > GOAL_S for d in durations) / len(durations)
    return node, longest


def check_result(node, ct, expected):
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(ct), atol=1e-6)
    np.testing.assert_allclose(ijk_to_ras(node), expected.affine, atol=1e-6)
    assert nodes.geometry(node)[1] == SHAPE
    got = voxels(node)
    assert got.dtype == expected.array.dtype
    np.testing.assert_allclose(got, expected.array, rtol=0, atol=1e-3)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_submit_and_download_of_a_full_ct_never_block_the_main_thread(local, ct, expected, where):
    if where == "local":  # loopback: the NRRD goes up uncompressed, straight from the node's memory
        logic = local
    else:  # a "remote" service (the same server by its address): gzip-compressed piece by piece first
        logic = ServiceLogic(local.scene)
        logic.useRemoteServer(local.server.url, local.server.token)
    node, longest = run_timed(logic, ct)
    print(f"\n{where}: longest main-thread call per phase (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in longest.items()))
    check_result(node, ct, expected)
    share = longest.pop("share over 0.1 s")
    assert max(longest.values()) < BUDGET_S, longest
    assert share <= 0.05, (share, longest)
    nodes.remove_node(local.scene, node)


def test_the_stepwise_encoder_writes_the_file_slicers_writer_writes(tmp_path):
    """Header byte for byte and the same voxels, raw and gzip, for a few scalar types."""
    scene = slicer.vtkMRMLScene()
    for scalar_type, shape in ((vtk.VTK_SHORT, (13, 17, 11)), (vtk.VTK_FLOAT, (9, 8, 7)),
                               (vtk.VTK_UNSIGNED_CHAR, (5, 6, 4))):
        node = ct_like(scene, shape, "small")
        if scalar_type != vtk.VTK_SHORT:
            cast = vtk.vtkImageCast()
            cast.SetInputData(node.GetImageData())
            cast.SetOutputScalarType(scalar_type)
            cast.Update()
            node.SetAndObserveImageData(cast.GetOutput())
        for compress in (False, True):
            old = nodes.write_volume(node, str(tmp_path / "old.nrrd"), compress=compress)
            encoder = nodes.NrrdEncoder(node, str(tmp_path), compress=compress)
            new = encoder.write(str(tmp_path / "new.nrrd"))
            a, b = open(old, "rb").read(), open(new, "rb").read()
            ha, hb = a[:a.index(b"\n\n") + 2], b[:b.index(b"\n\n") + 2]
            assert ha == hb
            da, db = a[len(ha):], b[len(hb):]
            if compress:
                da, db = gzip.decompress(da), gzip.decompress(db)
            else:
                assert encoder.length == len(b)
            assert da == db
            # and the stepwise loader reads back what Slicer's storage node reads
            loader = nodes.NrrdLoader(new)
            assert loader.supported
            while not loader.step(0.05):
                pass
            assert loader.error is None
            mine = nodes.volume_from_array(scene, loader.array, loader.dims, loader.ijk_to_ras, "mine")
            theirs = nodes.read_volume(scene, new, "theirs")
            np.testing.assert_allclose(ijk_to_ras(mine), ijk_to_ras(theirs), atol=1e-9)
            np.testing.assert_array_equal(voxels(mine), voxels(theirs))
            for n in (mine, theirs):
                nodes.remove_node(scene, n)
        nodes.remove_node(scene, node)


def test_cancel_while_the_input_is_still_being_compressed_leaves_nothing(local, ct):
    import os

    logic = ServiceLogic(local.scene)
    logic.useRemoteServer(local.server.url, local.server.token)
    before = local.scene.GetNumberOfNodes()
    job = logic.submitSimulate(ct, views=VIEWS, bins=BINS)
    assert job.phase == "uploading" and job.transfer.phase == "encoding"  # 157 MB do not compress in one poll
    logic.cancel(job)
    assert job.done and job.state == "cancelled" and not os.path.exists(job.workDir)
    assert local.scene.GetNumberOfNodes() == before
    assert logic.client().jobs() == []
