"""API fuzzing with Schemathesis against a real `meddiffusion serve` on 127.0.0.1, driven by the
service's own OpenAPI schema (request body, bearer security scheme, error answers). A bounded
number of examples per operation, derandomised (a fixed seed): no 500, every answer documented,
the server answers health afterwards, and nothing is written outside its work folder (the kernel
choices the CPU kernels record under $MEDDIFFUSION_CACHE/kernels are the one documented exception)."""
import json
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from MedDiffusionLib.client import Client, LocalServer

EXAMPLES = 30


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("tmp", "home", "cache"):
        (root / name).mkdir()
    env = {"TMPDIR": str(root / "tmp"), "HOME": str(root / "home"), "MEDDIFFUSION_CACHE": str(root / "cache"),
           "HF_HUB_OFFLINE": "1"}
    srv = LocalServer(log_file=root / "serve.log", env=env, extra_args=[
        "--work-dir", str(root / "work"), "--max-volumes", "1", "--max-voxels", str(64 ** 3),
        "--max-views", "8", "--max-bins", "64", "--job-time-limit", "20", "--max-upload-mb", "2",
        "--auth-failures", "100000"])  # negative cases send bad tokens: do not lock the fuzzer out
    srv.start(timeout=120)
    srv.root = root
    srv.before = _snapshot(root)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    doc = Client(fuzz_server.url, fuzz_server.token)._request("GET", "/openapi.json")
    return schemathesis.openapi.from_dict(doc)


def test_fuzz_no_server_errors(fuzz_server, api_schema):
    """Every operation of the schema, EXAMPLES generated requests each (valid and invalid bodies,
    headers and path values), with the real token. schemathesis' pytest plugin is not used: its
    lazy loader reads a private pytest attribute that pytest 9 removed; hypothesis drives the
    operations' strategies directly instead."""
    headers = {"Authorization": f"Bearer {fuzz_server.token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/jobs", "GET /v1/jobs/{job_id}",
                                                                        "DELETE /v1/jobs/{job_id}", "GET /v1/health"}
    seen: dict[str, set] = {}
    for op in operations:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
        def run(case):
            response = case.call_and_validate(base_url=fuzz_server.url, headers=headers, checks=checks)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            if case.method == "POST" and response.status_code == 202:
                Client(fuzz_server.url, fuzz_server.token).delete(response.json()["id"])

        run()
    assert {202, 400} <= seen["POST /v1/jobs"] and 404 in seen["GET /v1/jobs/{job_id}"]


def test_fuzzed_server_is_healthy_and_wrote_only_its_work_folder(fuzz_server):
    client = Client(fuzz_server.url, fuzz_server.token)
    assert client.health()["version"]
    time.sleep(0.5)
    root = fuzz_server.root
    changed = [p for p, m in _snapshot(root).items() if fuzz_server.before.get(p) != m]
    allowed = (root / "work", root / "cache" / "kernels")
    outside = [p for p in changed if not any(a in p.parents for a in allowed) and p.name != "serve.log"]
    assert outside == [], outside
    assert list((root / "tmp").iterdir()) == []
    assert "Traceback" not in fuzz_server.log_tail(2000), fuzz_server.log_tail(60)
    log = (root / "serve.log").read_text()
    assert json.dumps(fuzz_server.token) not in log and fuzz_server.token not in log
