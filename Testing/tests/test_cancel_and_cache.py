"""simulate-sparse-view honours cancel (per chunk of axial slices) without changing its result, and
the job service's ModelCache keeps at most ``max_pipelines`` pipelines (least recently used out)."""
import numpy as np
import pytest

from MedDiffusionLib.data.volumes import read_volume
from MedDiffusionLib.errors import Cancelled
from MedDiffusionLib.jobs import ModelCache, ProgressEvent, resolve, run_job
from MedDiffusionLib.pipelines.conditioned import simulate_sparse_view

from conftest import DATA

CT = DATA / "lung2_crop.nii.gz"  # 128 x 128 x 24, axial slices along k
SLICES = 24


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT)


def test_simulate_cancelled_after_the_first_chunk(ct):
    calls, done = [], []

    def cancel() -> bool:  # false on its first call (before chunk 0), true from then on
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        simulate_sparse_view(ct, views=8, bins=64, chunk=4, cancel=cancel,
                             progress=lambda d, t: done.append((d, t)))
    assert len(calls) == 2                     # asked before chunk 0 and before chunk 1, then stopped
    assert done == [(0, SLICES), (4, SLICES)]  # exactly one chunk of 4 of the 6 was computed


def test_simulate_result_is_unchanged_by_cancel_and_progress(ct):
    plain = simulate_sparse_view(ct, views=8, bins=64)
    done = []
    watched = simulate_sparse_view(ct, views=8, bins=64, cancel=lambda: False,
                                   progress=lambda d, t: done.append((d, t)))
    assert np.array_equal(plain.array, watched.array)
    assert np.array_equal(plain.affine, watched.affine)
    assert plain.array.dtype == watched.array.dtype
    assert done == [(0, SLICES), (16, SLICES), (SLICES, SLICES)]  # default chunk of 16 slices


def _sim_spec():
    return {"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64, "device": "cpu"},
            "inputs": {"input": str(CT)}}


def test_run_job_simulate_cancelled_from_the_start():
    events: list[ProgressEvent] = []
    with pytest.raises(Cancelled):
        run_job(_sim_spec(), progress=events.append, cancel=lambda: True)
    assert not [e for e in events if e.phase == "sampling" and e.step > 0]


def test_run_job_simulate_reports_slices():
    events: list[ProgressEvent] = []
    res = run_job(_sim_spec(), progress=events.append, cancel=lambda: False)
    steps = [(e.step, e.total) for e in events if e.phase == "sampling" and e.total]
    assert steps == [(0, SLICES), (16, SLICES), (SLICES, SLICES)]
    assert np.array_equal(res.results[0].volume.array,
                          simulate_sparse_view(read_volume(CT), views=8, bins=64).array)


def test_model_cache_keeps_at_most_max_pipelines():
    cache = ModelCache(max_pipelines=1)
    fast = resolve({"task": "generate", "params": {"mode": "fast", "device": "cpu"}})
    ref = resolve({"task": "generate", "params": {"mode": "reference", "device": "cpu"}})
    p_fast = cache.generation(fast, "cpu")
    assert cache.loads == 1 and len(cache.keys()) == 1
    p_ref = cache.generation(ref, "cpu")
    assert p_ref is not p_fast
    assert cache.loads == 2
    keys = cache.keys()
    assert len(keys) == 1 and "reference" in keys[0]
    assert cache.generation(ref, "cpu") is p_ref  # the kept key: no new load
    assert cache.loads == 2
    assert cache.clear() == keys and cache.keys() == []


def test_model_cache_evicts_least_recently_used():
    cache = ModelCache()  # default bound: 2
    assert cache.max_pipelines == 2
    fast = resolve({"task": "generate", "params": {"mode": "fast", "device": "cpu"}})
    ref = resolve({"task": "generate", "params": {"mode": "reference", "device": "cpu"}})
    bf16 = resolve({"task": "generate", "params": {"mode": "fast", "precision": "bf16", "device": "cpu"}})
    p_fast = cache.generation(fast, "cpu")
    cache.generation(ref, "cpu")
    assert cache.generation(fast, "cpu") is p_fast  # fast is now the most recently used
    cache.generation(bf16, "cpu")                   # so reference goes
    assert cache.loads == 3
    assert len(cache.keys()) == 2 and not any("reference" in k for k in cache.keys())
    assert cache.generation(fast, "cpu") is p_fast and cache.loads == 3


def test_model_cache_bound_must_be_positive():
    with pytest.raises(ValueError):
        ModelCache(max_pipelines=0)
