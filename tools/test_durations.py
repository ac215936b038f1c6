"""Refresh tests/durations.json, the weights `tests/conftest.py` orders the suite by (longest first).

Usage: `python tools/test_durations.py LOG > tests/durations.json`, where LOG is the output of a
suite run with `--durations=0` (pytest's "slowest durations" lines, `12.34s call tests/...`) or the
JSON lines of `NPU_DIT_TEST_CPU_LOG=LOG make test` (wall seconds of each test).
"""

from __future__ import annotations

import json
import re
import sys

_LINE = re.compile(r"^([0-9.]+)s call\s+(\S+)")


def read(path: str) -> dict[str, float]:
    seconds: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                record = json.loads(line)
                seconds[record["test"]] = record["wall"]
            elif (m := _LINE.match(line)) is not None:
                seconds[m.group(2)] = float(m.group(1))
    return seconds


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    durations = read(sys.argv[1])
    if not durations:
        sys.exit(f"no test durations in {sys.argv[1]}: run the suite with --durations=0")
    print(json.dumps({k: round(v, 1) for k, v in sorted(durations.items(), key=lambda kv: -kv[1])}, indent=1))
