"""Serve Autobahn|Testsuite fuzzingserver cases with kosoku and write one verdict file.

Usage: python3 serve.py PORT OUT.json [--cases "1.*,2.*"] [--exclude "9.1.6,..."] [--reports DIR]

Listens on 127.0.0.1:PORT until a client has run every selected case (and asked for
/updateReports), then writes OUT.json in the format fuzz.py writes.
"""

from __future__ import annotations

import asyncio
import os
import sys

from kosoku import FailureError, run_fuzzingserver

from fuzz import arguments, split, write_verdicts


async def serve(port: int, cases, exclude) -> list:
    try:
        async with run_fuzzingserver(cases, exclude, host="127.0.0.1", port=port) as server:
            return await server.get_result()
    except FailureError as failure:
        # Raised when any case is not OK; it carries the results of the whole run.
        return failure.results


def main() -> int:
    args = arguments("port", int)
    results = asyncio.run(serve(args.port, split(args.cases), split(args.exclude)))
    return write_verdicts(results, args.out, args.reports, f"fuzzingserver on port {args.port}")


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # As in fuzz.py: leave without interpreter finalization (kosoku's runtime may abort there).
    os._exit(code)
