"""The first fast CPU run on a machine times the convolution kernels once; it says so (a notice in
the job's progress, which the CLI prints and the Slicer panel shows), and later runs do not."""
from MedDiffusionLib.jobs import ModelCache, run_job


def test_first_run_announces_the_kernel_timing(tmp_path, monkeypatch):
    from MedDiffusionLib.models.kernels import choices  # the module whose globals the choices live in

    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choices, "_CHOICES", {})  # as in a fresh process
    spec = {"task": "generate", "params": {"sampler": "ddim", "steps": 1, "device": "cpu"}}
    notices = []
    for _ in range(2):
        seen = []
        run_job(spec, cache=ModelCache(), progress=lambda ev: seen.append(ev.notice) if ev.notice else None)
        notices.append([n for n in seen if "timed once" in n])
    assert len(notices[0]) == 1 and notices[1] == []
    assert list((tmp_path / "cache").rglob("choices-*.json"))
