"""`surgery` command line: identity-BN conversion and the tools around it.

Exit codes: 0 ok, 1 failure (a one-line message; --debug for the traceback),
2 usage error (a bad option or value), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

from surgery.cli.options import check_options
from surgery.errors import SurgeryError, UsageError, first_line
from surgery.runtime.quiet import import_keras_quietly


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("surgery: interrupted; nothing was written", file=sys.stderr)
        return 130


def _main(argv):
    # No backend yet: --help and usage errors answer in a fraction of a second.
    args = _parser().parse_args(argv)
    try:
        check_options(args)
        import_keras_quietly()
        from surgery.runtime.progress import one_bar

        with one_bar(1 if args.format == "text" else 0), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            result = args.run(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"surgery: error: {first_line(e)}", file=sys.stderr)
        return 2
    except (SurgeryError, OSError) as e:
        if args.debug:
            raise
        print(f"surgery: error: {first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the promise is one line, always
        if args.debug:
            raise
        print(
            f"surgery: error: {type(e).__name__}: {first_line(e)} "
            "(unexpected; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    if args.format == "json":
        if getattr(args, "notes", None):
            result = {**result, "notes": args.notes}
        print(json.dumps(_strict_json(result)))
    return 0 if result.get("ok", True) else 1


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line, like the errors."""
    print(f"surgery: warning: {first_line(message)}", file=sys.stderr)


def _strict_json(value):
    """inf and NaN (e.g. max_abs_diff against NaN outputs) as strings: JSON
    has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _parser() -> argparse.ArgumentParser:
    from surgery.cli import convert, deploy, edit, inspect, prune, stats

    parser = argparse.ArgumentParser(
        prog="surgery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text (default): a report for people, with progress bars; json: "
        "one JSON object on stdout, no progress bars",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for module in (convert, inspect, stats, deploy, edit, prune):
        module.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
