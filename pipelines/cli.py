"""The ``gradmimic`` command: one CLI, subcommands that grow as stages land."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmimic", description="Grad-Mimic data selection on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks that print the numbers issues ask for")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from .bench import overhead

    p = bench_sub.add_parser("overhead", help="cost of an exact Grad-Mimic step vs a plain step and vmap")
    overhead.add_arguments(p)
    p.set_defaults(func=overhead.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"gradmimic: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
