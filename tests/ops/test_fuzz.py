"""Fuzz the op edge: hypothesis draws batches of malformed and edge-case calls (shapes, dtypes, strides and
offset views, meta tensors among CPU ones, sizes near 2^31, empty dimensions, non-tensor arguments, NaN/Inf
locations); each batch runs in a child process (tests/ops/fuzz_driver.py). A case fails the test when the child
dies from a signal or hangs on it, when an output or gradient differs from the float64 reference, when an
invalid call returns anything, or when a call fails with anything but a clean ValueError/TypeError/MemoryError.
`python tests/ops/fuzz_driver.py --cases 5000` runs the same generator at scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.ops import fuzz_driver as fuzz

T = TypeVar("T")
CASES_PER_BATCH = 110


class HypothesisChoices:
    """The driver's primitive choices drawn through hypothesis."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return options[self.draw(st.integers(0, len(options) - 1))]

    def chance(self, percent: int) -> bool:
        return self.draw(st.integers(0, 99)) < percent


@st.composite
def case_batches(draw, size: int) -> list[dict]:
    choices = HypothesisChoices(draw)
    return [dict(fuzz.draw_case(choices), id=i) for i in range(size)]


# Shrinking would rerun child processes case by case; a failure already names its case in full.
@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(batch=case_batches(CASES_PER_BATCH))
def test_op_edge_fuzz(batch):
    results = fuzz.run_cases(batch, batch=len(batch))
    counts, failures = fuzz.summarise(batch, results)
    print(counts)
    assert not failures, f"{len(failures)} bad outcomes ({counts}):\n" + "\n".join(failures[:10])


def test_harness_attributes_a_crash_and_a_hang_to_their_cases():
    ok = dict(fuzz.draw_cases(1, seed=3)[0], mutations=[], check_finite=False)
    cases = [dict(ok, id=0), dict(op="harness_selftest", action="segv", id=1), dict(ok, id=2),
             dict(op="harness_selftest", action="hang", id=3), dict(ok, id=4)]
    results = fuzz.run_cases(cases, batch=len(cases), case_timeout=2.0)
    outcomes = [r["outcome"] for r in results]
    assert outcomes[1] == "crash" and "SIGSEGV" in results[1]["detail"]
    assert outcomes[3] == "hang"
    assert outcomes[0] == outcomes[2] == outcomes[4] != "crash"
