"""`python -m countersign_client METHOD PATH [--json BODY]`: a gated call from a shell.

Reads COUNTERSIGN_URL (default http://127.0.0.1:5000) and COUNTERSIGN_TOKEN. Progress goes to
stderr, the final response body to stdout. Exit codes: 0 success (2xx), 1 other HTTP error,
2 denied, 3 expired or withdrawn, 4 timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import ApprovalDenied, ApprovalExpired, ApprovalTimeout, CountersignClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m countersign_client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("method")
    parser.add_argument("path")
    parser.add_argument("--json", dest="body", help="JSON request body")
    parser.add_argument("--url", default=os.environ.get("COUNTERSIGN_URL", "http://127.0.0.1:5000"))
    parser.add_argument("--max-wait", type=float, default=3600)
    args = parser.parse_args(argv)
    token = os.environ.get("COUNTERSIGN_TOKEN")
    if not token:
        parser.error("set COUNTERSIGN_TOKEN")
    client = CountersignClient(
        args.url,
        token,
        max_wait=args.max_wait,
        on_progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    try:
        response = client.call(args.method, args.path, json.loads(args.body) if args.body else None)
    except ApprovalDenied as denied:
        print(f"denied: {denied.reason}", file=sys.stderr)
        return 2
    except ApprovalExpired as expired:
        print(str(expired), file=sys.stderr)
        return 3
    except ApprovalTimeout as timeout:
        print(str(timeout), file=sys.stderr)
        return 4
    print(f"HTTP {response.status}", file=sys.stderr)
    if response.body:
        print(response.body.decode(errors="replace"))
    return 0 if 200 <= response.status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
