"""`surgery` command line: identity-BN conversion and the tools around it.

Exit codes: 0 ok, 1 failure (a one-line message; --debug for the traceback),
2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from surgery.errors import SurgeryError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from surgery.progress import one_bar

    try:
        with one_bar(1 if args.format == "text" else 0):
            result = args.run(args)
    except (SurgeryError, OSError) as e:
        if args.debug:
            raise
        print(f"surgery: error: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        if getattr(args, "notes", None):
            result = {**result, "notes": args.notes}
        print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


def _parser() -> argparse.ArgumentParser:
    from surgery.cli import convert, deploy, inspect, stats

    parser = argparse.ArgumentParser(
        prog="surgery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for module in (convert, inspect, stats, deploy):
        module.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
