"""Run Autobahn|Testsuite fuzzingclient cases with kosoku and write one verdict file.

Usage: python3 fuzz.py URL OUT.json [--cases "1.*,2.*"] [--exclude "9.1.6,..."] [--reports DIR]

OUT.json maps each case id to its verdict and close details:
  {"1.1.1": {"behavior": "OK", "behaviorClose": "OK", "remoteCloseCode": 1000, ...}, ...}
--reports DIR also writes kosoku's full Autobahn-style reports (JSON + HTML per case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from kosoku import FailureError, run_fuzzingclient


def split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [p.strip() for p in value.split(",") if p.strip()]


def to_dict(r) -> dict:
    return {
        "behavior": r.behavior.value,
        "behaviorClose": r.behavior_close.value,
        "remoteCloseCode": r.remote_close_code,
        "remoteCloseReason": r.remote_close_reason,
        "result": r.result,
        "resultClose": r.result_close,
        "duration": r.duration,
        "agent": r.agent,
    }


async def run(url: str, cases, exclude) -> list:
    try:
        return await run_fuzzingclient(url, cases, exclude)
    except FailureError as failure:
        # Raised when any case is not OK; it carries the results of the whole run.
        return failure.results


def arguments(target: str, target_type=str) -> argparse.Namespace:
    """TARGET OUT.json [--cases] [--exclude] [--reports]: what fuzz.py and serve.py take."""
    ap = argparse.ArgumentParser()
    ap.add_argument(target, type=target_type)
    ap.add_argument("out")
    ap.add_argument("--cases")
    ap.add_argument("--exclude")
    ap.add_argument("--reports")
    return ap.parse_args()


def write_verdicts(results: list, out: str, reports: str | None, label: str) -> int:
    """Writes OUT.json (and kosoku's reports); the exit status."""
    verdicts = {r.case_id: to_dict(r) for r in results}
    with open(out + ".tmp", "w") as f:
        json.dump(verdicts, f, indent=1)
        f.write("\n")
    os.replace(out + ".tmp", out)
    if reports:
        from kosoku._report import write_reports  # kosoku's own report writer

        write_reports(results, reports)
    print(f"{label}: {len(verdicts)} cases", file=sys.stderr)
    return 0 if verdicts else 1


def main() -> int:
    args = arguments("url")
    results = asyncio.run(run(args.url, split(args.cases), split(args.exclude)))
    return write_verdicts(results, args.out, args.reports, args.url)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter finalization: kosoku's native runtime has been seen to abort
    # (SIGABRT) while the interpreter shuts down, after all results were written.
    os._exit(code)
