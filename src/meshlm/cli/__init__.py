"""`meshlm` command line. Each module in this package with a `register(subparsers)` function
adds its own sub-commands, so commands live next to nothing but themselves.

User errors (`MeshlmError`, bad arguments) print one line and exit 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from meshlm.errors import MeshlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlm", description="Partitioned transformer inference after Pope et al. (2022): an analytical "
                                   "planner for partitioning layouts and a JAX engine that runs them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        module = importlib.import_module(f"{__name__}.{mod}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MeshlmError as e:
        print(f"meshlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value exits 2 with argparse's one-line message)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def int_list(text: str) -> list[int]:
    """argparse type: '1,4,16' -> [1, 4, 16], each >= 1."""
    return [positive_int(t) for t in text.split(",") if t]
