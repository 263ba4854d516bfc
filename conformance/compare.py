"""Compare per-case verdicts of kosoku report folders (index.json files).

Usage:
  python3 compare.py summary DIR                      # verdict counts of one run
  python3 compare.py diff DIRECT PROXIED [--json OUT] # case-by-case comparison

A case's verdict is the pair (behavior, behaviorClose). `diff` prints every case whose
verdict differs, then one summary line, and exits 1 if any case differs or is missing.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split("."))


def load(folder: str) -> dict[str, dict]:
    """case id -> index entry (plus the case file's detail when there is one)."""
    root = Path(folder)
    index = json.loads((root / "index.json").read_text())
    cases: dict[str, dict] = {}
    # The index is keyed by agent (the Server header, or the address when a handshake
    # failed), so one run can span several agents.
    for _agent, entries in index.items():
        for case_id, entry in entries.items():
            detail = {}
            report = root / entry.get("reportfile", "")
            if report.is_file():
                try:
                    detail = json.loads(report.read_text())
                except ValueError:
                    pass
            cases[case_id] = {
                "behavior": entry.get("behavior"),
                "behaviorClose": entry.get("behaviorClose"),
                "remoteCloseCode": entry.get("remoteCloseCode"),
                "result": detail.get("result"),
                "resultClose": detail.get("resultClose"),
                "remoteCloseReason": detail.get("remoteCloseReason"),
                "duration": entry.get("duration"),
            }
    return dict(sorted(cases.items(), key=lambda kv: case_key(kv[0])))


def verdict(case: dict | None) -> str:
    if case is None:
        return "MISSING"
    return f"{case['behavior']}/{case['behaviorClose']}"


def summary(folder: str) -> dict[str, int]:
    cases = load(folder)
    counts = collections.Counter(verdict(c) for c in cases.values())
    return dict(sorted(counts.items()))


def describe(case: dict | None) -> str:
    if case is None:
        return "no result"
    parts = [verdict(case), f"close {case['remoteCloseCode']}"]
    if case.get("remoteCloseReason"):
        parts.append(repr(case["remoteCloseReason"]))
    if case.get("result") and case["behavior"] != "OK":
        parts.append(f"- {case['result']}")
    return " ".join(str(p) for p in parts)


def diff(direct_dir: str, proxied_dir: str, out: str | None, label: str) -> int:
    direct, proxied = load(direct_dir), load(proxied_dir)
    ids = sorted(set(direct) | set(proxied), key=case_key)
    differ = []
    for case_id in ids:
        d, p = direct.get(case_id), proxied.get(case_id)
        if verdict(d) != verdict(p):
            differ.append(case_id)
            print(f"  DIFFER {case_id}: direct {describe(d)} | {label} {describe(p)}")
    same = len(ids) - len(differ)
    print(
        f"conformance: {len(ids)} cases, {same} same verdict, {len(differ)} differ"
        f" (direct {summary(direct_dir)}; {label} {summary(proxied_dir)})"
    )
    if out:
        Path(out).write_text(
            json.dumps(
                {
                    "cases": len(ids),
                    "same": same,
                    "differ": differ,
                    "direct": {k: verdict(v) for k, v in direct.items()},
                    label: {k: verdict(v) for k, v in proxied.items()},
                },
                indent=1,
            )
            + "\n"
        )
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "summary":
        cases = load(argv[1])
        print(f"{len(cases)} cases: {summary(argv[1])}")
        for case_id, case in cases.items():
            if verdict(case) != "OK/OK":
                print(f"  {case_id}: {describe(case)}")
        return 0
    if len(argv) >= 3 and argv[0] == "diff":
        out = argv[argv.index("--json") + 1] if "--json" in argv else None
        label = argv[argv.index("--label") + 1] if "--label" in argv else "proxied"
        return diff(argv[1], argv[2], out, label)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
