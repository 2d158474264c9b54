"""How hard the fuzz tests try: a quick budget by default, a long one on request.

``HYPOTHESIS_PROFILE=fuzz`` (the ``fuzz`` tox env) gives every test here its
long budget, well over 100,000 inputs in all; anything else gives the quick
one that the ordinary test run can afford. Each test picks its settings with
``settings.get_profile(NAME)`` for a NAME registered below, rather than this
file loading a profile for the whole session: the rest of the suite keeps
its own settings, and under ``CI`` the quick budgets keep Hypothesis's ``ci``
profile (derandomized) as their parent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"

# Profile name: (quick examples, long examples). The long budgets are sized by
# each test's cost per input (0.7 ms for raw bytes into decode() up to ~8 ms
# for a conversation or a session actor), so that the whole directory tries
# about 112,000 inputs in about five minutes on the 2-core reference machine.
BUDGETS = {
    "fuzz-bytes": (200, 30_000),  # raw bytes into decode()
    "fuzz-length-prefix": (200, 20_000),  # oversized and zero length prefixes
    "fuzz-round-trip": (200, 15_000),  # valid messages through encode/decode
    "fuzz-msgpack": (200, 12_000),  # random msgpack into decode()
    "fuzz-mangled": (200, 12_000),  # valid messages broken, into decode()
    "fuzz-stream": (200, 10_000),  # hostile streams into a Connection, cut up
    "fuzz-conversation": (200, 5_000),  # valid exchanges in both directions
    "fuzz-large": (30, 1_000),  # frames at the 64 KiB and 1 MiB limits
    "fuzz-session": (40, 2_000),  # a ClientSessionActor per input: threads
}

FUZZ_TIMEOUT = 1800
"""Seconds one test may run under the long budget (pyproject's default is 60)."""

_parent = settings.get_profile(settings.get_current_profile_name())
for _name, (_quick, _long) in BUDGETS.items():
    settings.register_profile(
        _name,
        _parent,
        max_examples=_long if FUZZING else _quick,
        # Inputs vary in cost (a 1 MiB frame, an actor's threads); time is
        # bounded by the budget and the timeout, not per example.
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
        # A long run is worth more when each one tries new inputs, even in CI;
        # a failure prints the blob that reproduces it.
        derandomize=False if FUZZING else _parent.derandomize,
        print_blob=True,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under the long budget, lift pyproject's 60 s per-test timeout here."""
    if not FUZZING:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(FUZZ_TIMEOUT))
