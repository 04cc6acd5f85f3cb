"""Fuzzing (hypothesis): random step-mode models and random call sequences on one compiled model == eager.

The grammar and the driver are in tests/fuzz.py. In CI the budget is a few seconds (a handful of
derandomized examples, the same every run). ``SNNCC_FUZZ_BUDGET`` asks for more: seconds (``600``,
``30m``, ``2h``) run batches of fresh random examples until the time is up; ``500x`` runs that many
examples. A failure prints the case as Python (model spec, setup, call sequence): paste it into
tests/test_fuzz_regressions.py. Shrinking is off (each example compiles models: it can take many
minutes); ``SNNCC_FUZZ_SHRINK=1`` turns it on.
"""
from __future__ import annotations

import os
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, seed, settings  # noqa: E402

import fuzz  # noqa: E402

SECONDS, EXAMPLES = fuzz.budget_from_env(os.environ.get("SNNCC_FUZZ_BUDGET"))
CI_EXAMPLES = 4

#: shrinking a failing case can take minutes (each example compiles a model): on only when asked
SHRINK = os.environ.get("SNNCC_FUZZ_SHRINK", "") not in ("", "0")
BASE = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
            phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else []),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


RATES = []          # every compared step's spike rate: the comparisons were not vacuous
COUNT = [0]         # examples run


def _case(spec, setup, ops) -> None:
    note(fuzz.describe(spec, setup, ops))
    COUNT[0] += 1
    stats = fuzz.run_case(spec, setup, ops, log=note)
    note(f"stats: {stats}")
    RATES.extend(stats.get("rates", []))


def _test(max_examples: int, derandomize: bool):
    @settings(max_examples=max_examples, derandomize=derandomize, **BASE)
    @given(fuzz.models(), fuzz.setups(), fuzz.calls())
    def inner(spec, setup, ops):
        _case(spec, setup, ops)
    return inner


@pytest.mark.filterwarnings("ignore::snncc.frontend.OpaqueModuleWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_models_and_call_sequences():
    """Random models, options and call sequences: every step equals the eager twin's."""
    RATES.clear()
    start = time.monotonic()
    if SECONDS is None:
        _test(EXAMPLES or CI_EXAMPLES, derandomize=EXAMPLES is None)()
    else:
        end = time.monotonic() + SECONDS
        batch = 0
        while time.monotonic() < end:
            seed(int(time.time() * 1000) % (2 ** 32) + batch)(_test(10, derandomize=False))()
            batch += 1
    print(f"\nfuzz: {COUNT[0]} examples, {len(RATES)} compared steps in {time.monotonic() - start:.0f} s, "
          f"mean spike rate {sum(RATES) / max(len(RATES), 1):.3f}")
    assert any(0.0 < r < 1.0 for r in RATES), f"no compared step had neurons both firing and silent: {RATES}"
