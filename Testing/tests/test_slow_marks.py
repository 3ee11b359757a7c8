"""The `slow` marker: slow_tests.txt marks what it lists, `-m "not slow"` leaves it out, and a
listed test that no longer exists stops the run (the list cannot rot)."""
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SUITE = {
    "test_a.py": """
import pytest

def test_fast(request):
    assert request.node.get_closest_marker("slow") is None

def test_slow(request):
    assert request.node.get_closest_marker("slow") is not None

@pytest.mark.parametrize("case", ["one", "two"])
def test_param(request, case):
    assert (request.node.get_closest_marker("slow") is not None) == (case == "two")
""",
    "test_b.py": """
def test_server(request):
    assert request.node.get_closest_marker("slow") is not None

class TestGroup:
    def test_in_class(self, request):
        assert request.node.get_closest_marker("slow") is not None
""",
}


@pytest.fixture
def pytester(pytester, monkeypatch):
    # the suites run in this process (fast) with a copy of the real conftest, which points
    # MEDDIFFUSION_CACHE at a fresh folder: give this process its own back afterwards
    monkeypatch.setenv("MEDDIFFUSION_CACHE", os.environ["MEDDIFFUSION_CACHE"])
    return pytester


def _suite(pytester, listing: str):
    shutil.copy(HERE / "conftest.py", pytester.path / "conftest.py")
    (pytester.path / "slow_tests.txt").write_text(listing)
    pytester.makepyfile(**SUITE)
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    slow: slow\n")


LISTING = """# comment
test_a.py::test_slow
test_a.py::test_param[two]   # one parametrization
test_b.py                    # a whole module
"""


def test_listed_tests_are_marked_and_deselected(pytester):
    _suite(pytester, LISTING)
    result = pytester.runpytest()
    result.assert_outcomes(passed=6)  # each test checks its own marker
    result = pytester.runpytest("-m", "not slow")
    result.assert_outcomes(passed=2, deselected=4)
    result = pytester.runpytest("-m", "slow")
    result.assert_outcomes(passed=4, deselected=2)


def test_a_listed_test_that_is_gone_stops_the_run(pytester):
    _suite(pytester, LISTING + "test_a.py::test_renamed\ntest_gone.py::test_x\n")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*slow_tests.txt lists tests that do not exist*",
                                 "*test_a.py::test_renamed (no such test)*",
                                 "*test_gone.py::test_x (no such module)*"])
    # running one test of the module by its id is not a reason to call the others gone
    _suite(pytester, LISTING)
    result = pytester.runpytest("test_a.py::test_fast")
    result.assert_outcomes(passed=1)


def test_this_suites_list_marks_a_known_slow_test_and_not_a_fast_one(request):
    assert request.node.get_closest_marker("slow") is None
    conftest = request.config.pluginmanager.get_plugin(str(HERE / "conftest.py"))
    entries = conftest.read_slow_list()
    assert "test_service_security.py::test_load_four_clients_five_jobs_each" in entries
    assert not any(e.startswith("test_slow_marks.py") for e in entries)
