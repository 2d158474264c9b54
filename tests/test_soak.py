"""The soak benchmark, run short: load, client deaths, app crashes and rogue
frames for 30 s, and every check it makes must hold (``benchmarks/soak.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_30_second_soak_passes_every_check() -> None:
    try:
        result = subprocess.run(
            [sys.executable, str(SOAK), "--duration", "30"],
            capture_output=True,
            text=True,
            # Under the test's own timeout, so the output is not lost: the
            # soak's children die with it (PR_SET_PDEATHSIG) and the server
            # goes when they have.
            timeout=110,
        )
    except subprocess.TimeoutExpired as exc:
        # What it printed so far comes as bytes, whatever text= said.
        partial = [
            out.decode(errors="replace") if isinstance(out, bytes) else out or ""
            for out in (exc.stdout, exc.stderr)
        ]
        pytest.fail("the soak did not finish in 110 s:\n" + "\n".join(partial))
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, output
    assert "ALL CHECKS PASSED" in result.stdout, output
