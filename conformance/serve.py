"""Serve Autobahn|Testsuite fuzzingserver cases with kosoku and write one verdict file.

Usage: python3 serve.py PORT OUT.json [--cases "1.*,2.*"] [--exclude "9.1.6,..."] [--reports DIR]

Listens on 127.0.0.1:PORT until a client has run every selected case (and asked for
/updateReports), then writes OUT.json in the format fuzz.py writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from kosoku import FailureError, run_fuzzingserver

from fuzz import split, to_dict


async def serve(port: int, cases, exclude) -> list:
    try:
        async with run_fuzzingserver(cases, exclude, host="127.0.0.1", port=port) as server:
            return await server.get_result()
    except FailureError as failure:
        # Raised when any case is not OK; it carries the results of the whole run.
        return failure.results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--cases")
    ap.add_argument("--exclude")
    ap.add_argument("--reports")
    args = ap.parse_args()
    results = asyncio.run(serve(args.port, split(args.cases), split(args.exclude)))
    verdicts = {r.case_id: to_dict(r) for r in results}
    with open(args.out + ".tmp", "w") as f:
        json.dump(verdicts, f, indent=1)
        f.write("\n")
    os.replace(args.out + ".tmp", args.out)
    if args.reports:
        from kosoku._report import write_reports  # kosoku's own report writer

        write_reports(results, args.reports)
    print(f"fuzzingserver on port {args.port}: {len(verdicts)} cases", file=sys.stderr)
    return 0 if verdicts else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # As in fuzz.py: leave without interpreter finalization (kosoku's runtime may abort there).
    os._exit(code)
