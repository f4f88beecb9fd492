"""CI's second run: the README states how many tests a fresh clone (no ../shared) passes and skips; check it.

Usage: python .ci/check_fresh_clone.py PYTEST_LOG README.md
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# pytest's closing line, e.g. "==== 312 passed, 47 skipped in 181.20s (0:03:01) ====".
SUMMARY = re.compile(r"^=+ (?P<body>.*?) in (?P<seconds>[\d.]+)s.*=+$")
# The README's sentence, e.g. "a fresh clone ... ends with **312 passed, 47 skipped**".
STATED = re.compile(r"\*\*(?P<passed>\d+) passed, (?P<skipped>\d+) skipped\*\* on a fresh clone")


def counts(log: str) -> tuple[dict[str, int], float]:
    for line in reversed(log.splitlines()):
        match = SUMMARY.match(line.strip())
        if match:
            found = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", match["body"])}
            return found, float(match["seconds"])
    raise SystemExit("check_fresh_clone: no pytest summary line in the log")


def main(log_path: str, readme_path: str) -> int:
    found, seconds = counts(Path(log_path).read_text())
    stated = STATED.search(Path(readme_path).read_text())
    if stated is None:
        print("check_fresh_clone: README.md does not state '**P passed, S skipped** on a fresh clone'")
        return 1
    want = {"passed": int(stated["passed"]), "skipped": int(stated["skipped"])}
    got = {"passed": found.get("passed", 0), "skipped": found.get("skipped", 0)}
    bad = {k: v for k, v in found.items() if k not in ("passed", "skipped", "warning", "warnings")}
    print(f"fresh clone: {got['passed']} passed, {got['skipped']} skipped in {seconds:.0f} s "
          f"(README: {want['passed']} passed, {want['skipped']} skipped)")
    if bad:
        print(f"check_fresh_clone: unexpected outcomes {bad}")
        return 1
    if got != want:
        print("check_fresh_clone: the README's fresh-clone count is out of date; update it to the line above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
