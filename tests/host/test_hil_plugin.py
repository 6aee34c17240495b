"""The HIL plugin end to end: an inner pytest run with --port virtual on a small device suite."""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.timeout(240)

DEVICE_SUITE = {
    "tests/device/dt.py": """
        class SkipTest(Exception):
            pass

        def skip(reason):
            raise SkipTest(reason)

        def double(x):
            return 2 * x
    """,
    "tests/device/test_one.py": """
        import sys
        from dt import double, skip

        COUNTER = []

        def test_runs_on_micropython():
            assert sys.implementation.name == 'micropython'
            COUNTER.append(1)

        def test_helper_module_and_firmware():
            import microcot
            assert double(21) == 42 and microcot.__version__

        def test_shares_module_state():
            assert COUNTER == [1]

        def test_fails_with_board_traceback():
            print('said on the board')
            values = [1, 2]
            assert values == [1, 3], 'values differ on the board'

        def test_skip_on_board():
            skip('no modem on this board')
    """,
    "tests/device/test_two.py": """
        BOARD_TIMEOUT = 2

        def test_soft_reset_between_modules():
            import sys
            assert 'test_one' not in sys.modules

        def test_hangs():
            while True:
                pass

        def test_board_usable_after_timeout():
            assert 1 + 1 == 2
    """,
}


@pytest.fixture
def suite(pytester):
    for rel, text in DEVICE_SUITE.items():
        path = pytester.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    pytester.makeini("[pytest]\nmicrocot_device_dir = tests/device\n")
    return pytester


def test_device_tests_run_on_a_virtual_board(suite):
    result = suite.runpytest_subprocess("--port", "virtual", "-v", "-rs", "-p", "no:cacheprovider",
                                        "--board-timeout", "30", "tests/device")
    out = result.stdout.str()
    assert "microcot board: virtual" in out
    result.assert_outcomes(passed=5, failed=2, skipped=1)
    # each test is its own item with a pass/fail of its own
    assert "test_one.py::test_runs_on_micropython PASSED" in out
    assert "test_one.py::test_shares_module_state PASSED" in out
    assert "test_two.py::test_soft_reset_between_modules PASSED" in out
    assert "test_two.py::test_board_usable_after_timeout PASSED" in out
    # the failure carries the board's traceback and output
    assert "failed on the board: AssertionError: values differ on the board" in out
    assert 'File "test_one.py", line' in out
    assert "said on the board" in out
    assert "test_hangs failed on the board: timed out on the board" in out
    assert "no modem on this board" in out


def test_without_board_the_same_modules_run_under_cpython(suite):
    suite.makeconftest("import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parent"
                       " / 'tests' / 'device'))\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-v", "tests/device/test_one.py",
                                        "-k", "fails_with or runs_on")
    # in-process: sys.implementation is CPython's, and the plain assert fails as usual
    result.assert_outcomes(failed=2)
    assert "microcot board" not in result.stdout.str()
