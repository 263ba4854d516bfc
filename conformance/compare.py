"""Compare per-case Autobahn verdicts written by fuzz.py.

Usage:
  python3 compare.py summary RUN.json
  python3 compare.py diff DIRECT.json PROXIED.json --expect expected-direct-vs-proxy.json
                          [--retry DIRECT2.json PROXIED2.json]... [--ids-out FILE] [--quiet]
  python3 compare.py check RUN.json --expect expected-builtin-echo.json [--label builtin-echo]
                           [--cases "1.*,2.*"]   # recorded verdicts of these cases only

A case's verdict is "behavior/behaviorClose", e.g. "OK/OK" or "NON-STRICT/OK".

diff: every case must have the same verdict direct and proxied. The only tolerated
difference is OK/OK <-> NON-STRICT/OK on the cases listed under "timing_equivalent" in the
expectation file (see its "why"). Prints every difference and one summary line
  conformance: N cases, S same verdict, T timing-equivalent, D differ
and exits 1 when D > 0 (a missing case counts as a difference). A case that differs but
agrees in a --retry pair (a rerun of just the differing cases) is counted and listed as
"agreed only on a rerun": a timing flake, not a failure. --ids-out writes the differing ids
(comma-separated); --quiet prints nothing else.

check: compares one run with the verdicts recorded in the expectation file ("verdicts" lists
every case that is not OK/OK; every other case must be OK/OK), with the same tolerance.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import sys

# Close reasons wsgate itself sends to a client (docs: design "Tunnel" table).
WSGATE_REASONS = {"protocol error", "frame too big", "invalid UTF-8", "rate limit", "bad gateway"}


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split("."))


def load(path: str) -> dict[str, dict]:
    with open(path) as f:
        cases = json.load(f)
    return dict(sorted(cases.items(), key=lambda kv: case_key(kv[0])))


def verdict(case: dict | None) -> str:
    if case is None:
        return "MISSING"
    return f"{case['behavior']}/{case['behaviorClose']}"


def counts(cases: dict[str, dict]) -> str:
    c = collections.Counter(verdict(v) for v in cases.values())
    return ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))


def describe(case: dict | None) -> str:
    if case is None:
        return "no result"
    text = f"{verdict(case)} close={case.get('remoteCloseCode')}"
    if case.get("remoteCloseReason"):
        text += f" {case['remoteCloseReason']!r}"
    if verdict(case) != "OK/OK":
        text += f" ({case.get('result')} / {case.get('resultClose')})"
    return text


def timing_rule(expect: dict) -> tuple[set[str], set[str]]:
    rule = expect.get("timing_equivalent", {})
    return set(rule.get("cases", [])), set(rule.get("verdicts", []))


def same_or_timing(case_id: str, a: str, b: str, expect: dict) -> str:
    if a == b:
        return "same"
    cases, verdicts = timing_rule(expect)
    if case_id in cases and a in verdicts and b in verdicts:
        return "timing"
    return "differ"


def report(
    total: int, same: int, timing: list[str], differ: list[str], rerun: list[str] | None = None
) -> None:
    line = f"conformance: {total} cases, {same} same verdict"
    line += f", {len(timing)} timing-equivalent"
    if timing:
        line += f" ({' '.join(timing)})"
    if rerun:
        line += f", {len(rerun)} agreed only on a rerun ({' '.join(rerun)})"
    line += f", {len(differ)} differ"
    if differ:
        line += f" ({' '.join(differ)})"
    print(line)


def cmd_diff(
    direct_path: str,
    proxied_path: str,
    expect: dict,
    label: str,
    retries: list[tuple[str, str]],
    ids_out: str | None,
    quiet: bool,
) -> int:
    direct, proxied = load(direct_path), load(proxied_path)
    reruns = [(load(d), load(p)) for d, p in retries]
    ids = sorted(set(direct) | set(proxied), key=case_key)
    timing, differ, rerun = [], [], []
    for case_id in ids:
        d, p = direct.get(case_id), proxied.get(case_id)
        kind = same_or_timing(case_id, verdict(d), verdict(p), expect)
        if kind == "same":
            continue
        if kind == "differ":
            # A case that differed is run again (both ways); it passes if a rerun agrees.
            for rd, rp in reruns:
                if case_id in rd or case_id in rp:
                    again = same_or_timing(
                        case_id, verdict(rd.get(case_id)), verdict(rp.get(case_id)), expect
                    )
                    if again != "differ":
                        kind = "rerun"
                        break
        {"timing": timing, "differ": differ, "rerun": rerun}[kind].append(case_id)
        tag = {"timing": "timing ", "differ": "DIFFER ", "rerun": "RERUN-OK "}[kind]
        if not quiet:
            print(f"  {tag}{case_id}: direct {describe(d)} | {label} {describe(p)}")
    if ids_out:
        with open(ids_out, "w") as f:
            f.write(",".join(differ))
    if quiet:
        return 1 if differ else 0
    by_wsgate = [
        c for c in ids if (proxied.get(c) or {}).get("remoteCloseReason") in WSGATE_REASONS
    ]
    print(f"  direct:  {counts(direct)}")
    print(f"  {label}: {counts(proxied)}")
    print(f"  cases failed by wsgate itself (its own close reason): {len(by_wsgate)}")
    same = len(ids) - len(timing) - len(differ) - len(rerun)
    report(len(ids), same, timing, differ, rerun)
    return 1 if differ else 0


def selected(case_id: str, patterns: str | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(case_id, p.strip()) for p in patterns.split(",") if p.strip())


def cmd_check(run_path: str, expect: dict, label: str, patterns: str | None) -> int:
    run = load(run_path)
    recorded = {c: v for c, v in expect.get("verdicts", {}).items() if selected(c, patterns)}
    excluded = set(expect.get("excluded", {}))
    ids = sorted((set(run) | set(recorded)) - excluded, key=case_key)
    timing, differ = [], []
    for case_id in ids:
        want = recorded.get(case_id, "OK/OK")
        got = verdict(run.get(case_id))
        kind = same_or_timing(case_id, want, got, expect)
        if kind == "same":
            continue
        (timing if kind == "timing" else differ).append(case_id)
        tag = "timing " if kind == "timing" else "DIFFER "
        print(f"  {tag}{case_id}: recorded {want} | {label} {describe(run.get(case_id))}")
    print(f"  {label}: {counts(run)}")
    report(len(ids), len(ids) - len(timing) - len(differ), timing, differ)
    return 1 if differ else 0


def cmd_summary(run_path: str) -> int:
    run = load(run_path)
    print(f"{len(run)} cases: {counts(run)}")
    for case_id, case in run.items():
        if verdict(case) != "OK/OK":
            print(f"  {case_id}: {describe(case)}")
    return 0


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv: list[str]) -> int:
    expect_path = option(argv, "--expect")
    expect = {}
    if expect_path:
        with open(expect_path) as f:
            expect = json.load(f)
    if len(argv) >= 2 and argv[0] == "summary":
        return cmd_summary(argv[1])
    if len(argv) >= 3 and argv[0] == "diff":
        retries = [
            (argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == "--retry"
        ]
        return cmd_diff(
            argv[1],
            argv[2],
            expect,
            option(argv, "--label", "proxied"),
            retries,
            option(argv, "--ids-out"),
            "--quiet" in argv,
        )
    if len(argv) >= 2 and argv[0] == "check":
        return cmd_check(
            argv[1], expect, option(argv, "--label", "run"), option(argv, "--cases")
        )
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
