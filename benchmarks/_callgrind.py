"""Instruction counts of a benchmark's cases, with valgrind's callgrind.

Timings on a shared VM move by a third from run to run; the number of
instructions a piece of code executes does not. A benchmark that supports
counting runs itself as ``SCRIPT --run CASE N`` (N calls of the case's loop
body, set-up included) and :func:`instructions_per_call` does so under
callgrind twice, with 200 and 1,200 calls: the difference over 1,000 is the
count per call, with start-up and warm-up cancelled out.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

__all__ = ["add_arguments", "instructions_per_call"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--instructions`` (count, don't time), and the hidden ``--run CASE N``."""
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions with callgrind instead of timing",
    )
    parser.add_argument("--run", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)


def instructions_per_call(
    script: str, case: str, *, under_valgrind: bool = True
) -> float:
    """Instructions per call of ``case``'s loop body in ``script``.

    With ``under_valgrind=False`` the case starts its own process under
    callgrind (a server, say) and ``script --run`` prints that process's
    ``Collected : N`` line on stderr itself.
    """
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    if not under_valgrind:
        valgrind = []

    def count(iterations: int) -> int:
        run = subprocess.run(
            [*valgrind, sys.executable, script, "--run", case, str(iterations)],
            capture_output=True,
            text=True,
            check=True,
            # The same string hashes every run: dict layouts, and so the
            # counts, do not move with hash randomization.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        match = re.search(r"Collected : (\d+)", run.stderr)
        if match is None:
            raise RuntimeError(f"no instruction count from callgrind:\n{run.stderr}")
        return int(match[1])

    return (count(1200) - count(200)) / 1000
