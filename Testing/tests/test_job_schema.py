"""Every job parameter validated at the door, with one schema (MedDiffusionLib.schema) and one
resolver (MedDiffusionLib.jobs.resolve) for every front end. No model runs here."""
import json

import numpy as np
import pytest

from conftest import DATA
from MedDiffusionLib import jobs
from MedDiffusionLib.data.volumes import Volume, read_volume
from MedDiffusionLib.errors import ResourceError, UserError
from MedDiffusionLib.jobs import Caps, JobSpec, check_input, check_memory, resolve
from MedDiffusionLib.schema import MAX_SPEC_BYTES, JobRequest, parse_spec

NAN, INF = float("nan"), float("inf")


def refused(raw, caps=None) -> str:
    """The one-line message of a spec refused by the service's door."""
    with pytest.raises(UserError) as err:
        parse_spec(raw if isinstance(raw, (str, bytes)) else json.dumps(raw), caps)
    message = str(err.value)
    assert "\n" not in message and len(message) <= 300, message
    return message


def refused_in_process(params, task="generate", caps=None, **spec) -> str:
    """The message of a spec refused by jobs.resolve, as the CLI and the Python API call it."""
    with pytest.raises(UserError) as err:
        resolve(JobSpec(task, params=params, **spec), caps=caps)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def gen(**params) -> str:
    return json.dumps({"task": "generate", "params": params})


# -- numbers: finite, whole, bounded --------------------------------------------------------------------------
def test_nan_and_infinity_literals_are_refused_not_internal_errors():
    assert "NaN" in refused('{"task": "generate", "params": {"seed": NaN}}')
    assert "Infinity" in refused('{"task": "generate", "params": {"size": [Infinity, 64, 64]}}')
    assert "finite" in refused('{"task": "generate", "params": {"spacing": [-Infinity, 1, 1]}}')
    assert "finite" in refused('{"task": "generate", "params": {"spacing": [1e999, 1, 1]}}')


@pytest.mark.parametrize("params, words", [
    ({"spacing": [NAN, 1, 1]}, "spacing"),
    ({"spacing": [1, INF, 1]}, "spacing"),
    ({"hu_window": [NAN, 100]}, "HU window"),
    ({"hu_window": [-1000, INF]}, "HU window"),
    ({"max_memory_gb": NAN}, "memory limit"),
    ({"max_memory_gb": INF}, "memory limit"),
])
def test_nan_and_infinite_parameters_are_refused_by_resolve(params, words):
    message = refused_in_process(params)
    assert words in message and "finite" in message


def test_huge_seed_is_refused_at_the_door():
    assert "seed" in refused(gen(seed=2 ** 70))
    assert "seed" in refused_in_process({"seed": 2 ** 70})
    assert "seed" in refused_in_process({"seed": NAN})
    assert resolve(JobSpec("generate", params={"seed": -5})).params["seed"] == -5
    assert resolve(JobSpec("generate", params={"seed": jobs.MAX_SEED})).params["seed"] == jobs.MAX_SEED


def test_absurd_size_is_refused_before_any_planner_runs():
    assert "at most 4096" in refused(gen(size=[10 ** 30, 64, 64]))
    assert "at most 4096" in refused_in_process({"size": [10 ** 30, 64, 64]})
    assert "size" in refused_in_process({"size": [INF, 64, 64]})
    assert "size" in refused_in_process({"size": [NAN, 64, 64]})


def test_num_volumes_has_an_absolute_cap_and_a_server_cap():
    assert "at most 64" in refused(gen(num_volumes=10000))
    assert "at most 64" in refused_in_process({"num_volumes": 10000})
    assert "at most 2 volumes" in refused(gen(num_volumes=3, sampler="ddim", steps=2), Caps(max_volumes=2))
    assert parse_spec(gen(num_volumes=2, sampler="ddim", steps=2), Caps(max_volumes=2)).params["num_volumes"] == 2


def test_integers_are_strict_but_whole_floats_are_kept():
    spec = parse_spec(gen(size=[64.0, 64.0, 64.0], sampler="dpm++", steps=3.0))
    assert spec.params["size"] == [64, 64, 64] and spec.params["steps"] == 3
    assert "integer" in refused(gen(sampler="ddim", steps="3"))
    assert "integer" in refused(gen(sampler="ddim", steps=3.5))
    assert "must be positive" in refused(gen(sampler="ddim", steps=0))
    assert "integer" in refused(gen(size=["64", "64", "64"]))
    assert "true or false" in refused(gen(hu="true"))
    assert "true or false" in refused(gen(hu=1))
    assert "integer" in refused_in_process({"sampler": "ddim", "steps": "3"})


# -- strings and devices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda-x1", "cudafoo", "cuda:00", "cuda:99", "CUDA", "meta", "cuda:" + "1" * 40])
def test_device_must_be_auto_cpu_cuda_or_a_small_cuda_index(device):
    assert "device" in refused(gen(device=device))
    assert "device" in refused_in_process({"device": device})


def test_devices_that_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:31"):
        assert resolve(JobSpec("generate", params={"device": device})).params["device"] == device


def test_a_huge_class_string_is_refused_without_echo():
    huge = "x" * (10 * 2 ** 20)
    for message in (refused(gen(**{"class": huge})), refused(gen(**{"class": huge}).encode()),
                    refused(gen(**{"class": "y" * 60000})), refused_in_process({"class": huge})):
        assert len(message) < 400 and "x" * 80 not in message and "y" * 80 not in message


def test_long_unknown_names_are_not_echoed():
    message = refused(json.dumps({"task": "generate", "k" * 5000: 1}))
    assert "unknown job spec field" in message and "k" * 80 not in message
    message = refused(json.dumps({"task": "generate", "params": {"p" * 5000: 1}}))
    assert "unknown parameter" in message and "p" * 80 not in message
    message = refused(json.dumps({"task": "generate", "model": "m" * 100}))
    assert "unknown model id" in message and "m" * 80 not in message
    assert "at most 4 inputs" in refused(json.dumps({"task": "generate", "inputs": {str(i): "x" for i in range(9)}}))


# -- the raw document --------------------------------------------------------------------------------------------
def test_a_too_large_spec_is_refused_before_parsing():
    raw = json.dumps({"task": "generate", "params": {"class": "CT"}, "model": " " * MAX_SPEC_BYTES})
    assert "too large" in refused(raw)
    assert "too large" in refused(raw.encode())


def test_deep_nesting_is_refused_without_recursion_error():
    message = refused("[" * 100000 + "]" * 100000)  # over the size limit too
    assert len(message) < 300
    message = refused("[" * 30000 + "]" * 30000)  # within the size limit: the depth scan refuses it
    assert "nested too deeply" in message
    message = refused('{"task": "generate", "params": {"size": ' + "[" * 5000 + "]" * 5000 + "}}")
    assert "nested too deeply" in message
    # brackets inside strings (with escaped quotes) are not nesting
    message = refused(json.dumps({"task": "generate", "params": {"class": '\\"' + "[" * 20 + '"{{{{{{{{{'}}))
    assert "nested" not in message and "class" in message


@pytest.mark.parametrize("raw, words", [
    ("", "empty"), ("[]", "JSON object"), ("null", "JSON object"), ("1e999", "finite"), ('{"task": ', "not valid JSON"),
    (b"\xff\xfe", "UTF-8"), ('{"task": "generate", "params": {"seed": 1' + "0" * 60 + "}}", "digits"),
])
def test_malformed_documents_get_one_line(raw, words):
    assert words in refused(raw)


# -- the messages every front end already relies on ----------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ({"task": "paint"}, "unknown task"),
    ({"task": "generate", "model": "nope"}, "unknown model id"),
    ({"task": "generate", "params": {"class": 9}}, "unknown class"),
    ({"task": "generate", "params": {"class": "MR T1"}}, "does not know class 3"),
    ({"task": "generate", "params": {"size": [100, 64, 64]}}, "nearest legal sizes"),
    ({"task": "generate", "params": {"steps": 0, "sampler": "ddim"}}, "must be positive"),
    ({"task": "generate", "params": {"colour": "red"}}, "unknown parameter"),
    ({"task": "generate", "weights": "/etc"}, "does not open local paths"),
    ({"task": "synthesize", "controlnet": "/etc/passwd", "inputs": {"input": "x.nrrd"}}, "never opens local paths"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels"}, "needs an input volume"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x", "/tmp/e": "y"}},
     "unknown input name"),
    ({"task": "generate", "output_format": ".exe"}, "unknown output format"),
    ({"task": "generate", "params": {"sampler": "euler"}}, "unknown sampler"),
])
def test_known_refusals_keep_their_words(spec, words):
    assert words in refused(spec)


# -- server caps ----------------------------------------------------------------------------------------------
def test_caps_on_steps_views_bins_and_voxels():
    caps = Caps(max_steps=50, max_views=100, max_bins=256, max_voxels=64 ** 3, max_batch_voxels=2 * 64 ** 3)
    assert "at most 50 sampler steps" in refused(gen(sampler="ddim", steps=51), caps)
    message = refused(gen(), caps)  # the bundled model's default is DDPM, 1000 steps
    assert "DDPM" in message and "ddim or dpm++" in message
    assert parse_spec(gen(sampler="ddim", steps=50), caps).params["steps"] == 50
    sim = {"task": "simulate-sparse-view", "inputs": {"input": "ct.nii.gz"}}
    assert "at most 100 views" in refused({**sim, "params": {"views": 101}}, caps)
    assert "at most 256 detector bins" in refused({**sim, "params": {"bins": 512}}, caps)
    assert parse_spec(json.dumps({**sim, "params": {"views": 100, "bins": 256}}), caps).params["views"] == 100
    assert "voxels per volume" in refused(gen(size=[128, 64, 64], sampler="ddim", steps=2), caps)
    assert "in one job" in refused(gen(num_volumes=3, sampler="ddim", steps=2), caps)
    assert "at most 50" in refused_in_process({"sampler": "ddim", "steps": 51}, caps=caps)


def test_default_caps_admit_every_trained_size_and_refuse_beyond():
    caps = Caps()
    assert parse_spec(gen(size=[512, 512, 512], sampler="ddim", steps=2), caps).params["size"] == [512, 512, 512]
    assert "voxels" in refused(gen(size=[1024, 512, 512], sampler="ddim", steps=2), caps)
    assert "at most 8 volumes" in refused(gen(num_volumes=9, sampler="ddim", steps=2), caps)
    with pytest.raises(ValueError):
        Caps(max_volumes=0)
    with pytest.raises(ValueError):
        Caps(job_time_limit_s=float("nan"))


def test_input_voxels_are_capped():
    spec = resolve(JobSpec("simulate-sparse-view", inputs={"input": "ct"}))
    vol = Volume(np.full((64, 64, 8), -1000, np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    check_input(spec, vol)  # no caps: accepted
    with pytest.raises(UserError, match="at most 1000"):
        check_input(spec, vol, caps=Caps(max_input_voxels=1000))
    with pytest.raises(UserError, match="at most 1000"):
        jobs.check_input_size((64, 64, 8), Caps(max_input_voxels=1000))


# -- inputs: geometry checked before anything runs -------------------------------------------------------------
def test_ct_wider_than_the_fan_beam_circle_is_a_user_error():
    spec = resolve(JobSpec("simulate-sparse-view", params={"views": 2, "bins": 16}, inputs={"input": "ct"}))
    wide = Volume(np.full((512, 512, 1), -1000, np.int16), np.diag([2.5, 2.5, 2.5, 1.0]))
    with pytest.raises(UserError, match="source circle"):
        check_input(spec, wide)
    with pytest.raises(UserError, match="source circle"):  # run_job refuses it before the operator runs
        jobs.run_job(spec, {"input": wide})
    fits = Volume(np.full((128, 128, 1), -1000, np.int16), np.diag([2.5, 2.5, 2.5, 1.0]))
    check_input(spec, fits)


def test_input_with_broken_geometry_is_refused():
    spec = resolve(JobSpec("simulate-sparse-view", inputs={"input": "ct"}))
    arr = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(UserError, match="not finite"):
        check_input(spec, Volume(arr, np.diag([np.nan, 1.0, 1.0, 1.0])))
    rec = resolve(JobSpec("reconstruct", controlnet="chest-ct-mini-sparse-view", inputs={"input": "x"}))
    with pytest.raises(UserError, match="crop the input"):  # a working grid beyond 4096 voxels per side
        check_input(rec, Volume(arr, np.diag([1e5, 1e5, 1e5, 1.0])))
    with pytest.raises(UserError, match="working grid"):
        check_input(rec, read_volume(DATA / "lung2_crop.nii.gz"), caps=Caps(max_voxels=1000))


# -- memory: inputs, outputs, controlled tasks and simulate are checked before they run -------------------------
def test_memory_check_counts_inputs_outputs_and_every_task(monkeypatch):
    import MedDiffusionLib.memory as memory

    ct = read_volume(DATA / "lung2_crop.nii.gz")
    gen_spec = resolve(JobSpec("generate", params={"sampler": "ddim", "steps": 2, "num_volumes": 4}))
    assert jobs.array_bytes(gen_spec) == 2 * 4 * 64 ** 3 * 4
    sim = resolve(JobSpec("simulate-sparse-view", params={"views": 3600, "bins": 8192}, inputs={"input": "ct"}))
    assert jobs.array_bytes(sim, [ct]) > ct.array.nbytes
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device="cpu": 2.0 ** 30)
    with pytest.raises(ResourceError, match="needs about .* force"):  # the fan-beam grids of 3600 x 8192 rays
        check_memory(sim, "cpu", None, {"input": ct})
    small = resolve(JobSpec("simulate-sparse-view", params={"views": 8, "bins": 64}, inputs={"input": "ct"}))
    assert check_memory(small, "cpu", None, {"input": ct}) is None
    forced = resolve(JobSpec("simulate-sparse-view", params={"views": 3600, "bins": 8192, "force": True},
                             inputs={"input": "ct"}))
    check_memory(forced, "cpu", None, {"input": ct})

    from dataclasses import dataclass

    @dataclass
    class Estimate:  # the fields of estimate.RunEstimate that check_memory reads
        peak_bytes: float
        host_bytes: float = 0.0

    class Pipe:  # what check_memory needs of a pipeline
        compression = 4

        def __init__(self, peak):
            self.peak, self.seen = peak, None

        def working_spacing(self):
            return (4.8, 4.8, 4.3)

        def estimate(self, size, steps, volumes, **decode):  # decode: the job's memory cap, spill folder, tiling
            self.seen = (list(size), steps, volumes)
            return Estimate(self.peak)

    rec = resolve(JobSpec("reconstruct", controlnet="chest-ct-mini-sparse-view", inputs={"input": "x"}))
    pipe = Pipe(0.5 * 2 ** 30)
    est = check_memory(rec, "cpu", pipe, {"input": ct})
    assert pipe.seen == ([64, 64, 32], rec.params["steps"], 1)  # the working grid of the input
    assert est.peak_bytes == 0.5 * 2 ** 30 + jobs.array_bytes(rec, [ct])
    with pytest.raises(ResourceError, match="needs about"):
        check_memory(rec, "cpu", Pipe(1.1 * 2 ** 30), {"input": ct})
    with pytest.raises(ResourceError, match="needs about"):  # the pipeline alone fits; with its outputs it does not
        check_memory(gen_spec, "cpu", Pipe(2 ** 30 - jobs.array_bytes(gen_spec) / 2), {})
    check_memory(gen_spec, "cpu", Pipe(2 ** 30 - 2 * jobs.array_bytes(gen_spec)), {})


# -- the schema for OpenAPI -------------------------------------------------------------------------------------
def test_json_schema_lists_every_parameter_and_validates_specs():
    import jsonschema

    schema = JobRequest.model_json_schema()
    params = schema["$defs"]["JobParams"]["properties"]
    assert set(params) == set(jobs.PARAM_DEFAULTS)
    assert set(schema["properties"]) == set(jobs.SPEC_FIELDS)
    assert schema["$defs"]["JobParams"]["additionalProperties"] is False
    json.dumps(schema)
    good = {"task": "generate", "params": {"class": "chest", "size": [64, 64, 64], "seed": 3, "hu": True}}
    jsonschema.validate(good, schema)
    for bad in ({"task": "generate", "params": {"seed": 2 ** 70}}, {"task": "generate", "params": {"hu": 1}},
                {"task": "generate", "params": {"device": "cuda-x1"}}, {"task": "generate", "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert parse_spec(json.dumps(good)).params["class"] == 1


def test_a_service_cache_never_opens_a_vanished_controlnet_name_as_a_path(tmp_path, monkeypatch):
    """A ControlNet name resolved at the door but gone when the job runs is an error about the
    field in a service's cache, never a path looked up relative to the server's working folder."""
    from MedDiffusionLib.model_cache import ModelCache

    spec = resolve(JobSpec("reconstruct", controlnet="chest-ct-mini-sparse-view", inputs={"input": "x"}))
    (tmp_path / "chest-ct-mini-sparse-view").write_bytes(b"not a checkpoint")  # what a path lookup would open
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not installed here any more") as info:
        ModelCache(local_paths=False).controlled(spec, "cpu", controlnet_dirs=[tmp_path / "empty"])
    assert info.value.field == "controlnet"


def test_compile_is_the_generation_networks_package_only():
    """``compile`` means one thing, the ahead-of-time package of the generation network: a
    ControlNet or simulation job that asks for it is told so, naming the field."""
    assert resolve(JobSpec("generate", params={"compile": True})).params["compile"] is True
    for spec in (JobSpec("reconstruct", controlnet="chest-ct-mini-sparse-view", params={"compile": True},
                         inputs={"input": "x"}),
                 JobSpec("simulate-sparse-view", params={"compile": True}, inputs={"input": "x"})):
        with pytest.raises(UserError, match="applies to generate only") as info:
            resolve(spec)
        assert info.value.field == "compile"


def test_one_model_per_task_at_the_door_and_in_the_resolver():
    """Each task's own pydantic model (its parameters only) is what the OpenAPI schema shows and
    the door checks; the in-process resolver refuses the same, naming the field."""
    import jsonschema

    from MedDiffusionLib.schema import TASK_PARAM_MODELS, request_schema

    assert {t: set(m.model_json_schema(by_alias=True)["properties"]) for t, m in TASK_PARAM_MODELS.items()} == \
        {t: set(names) for t, names in jobs.TASK_PARAMS.items()}
    schema = request_schema()
    jsonschema.validate({"task": "simulate-sparse-view", "params": {"views": 60}, "inputs": {"input": "ct.nrrd"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"task": "generate", "params": {"views": 60}}, schema)
    for spec, field in (({"task": "generate", "params": {"views": 60}}, "views"),
                        ({"task": "simulate-sparse-view", "params": {"steps": 5}, "inputs": {"input": "x"}}, "steps")):
        with pytest.raises(UserError, match=f"{field} is not a parameter of {spec['task']}") as door:
            parse_spec(json.dumps(spec))
        with pytest.raises(UserError, match=f"{field} is not a parameter of {spec['task']}") as api:
            resolve(spec)
        assert door.value.field == api.value.field == field
    # null means "the default" for any task, as before
    assert parse_spec(json.dumps({"task": "generate", "params": {"views": None}})).params["views"] == 40
