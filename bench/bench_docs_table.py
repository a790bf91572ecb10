"""A generated table between two HTML-comment markers of a docs page: splice it in, check it, print it.

Each ``bench_*_table.py`` renders its table from committed JSON and hands it to :func:`cli`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def splice(page: str, text: str, start: str, end: str, name: str = "the page") -> str:
    """``page`` with what lies between ``start`` and ``end`` replaced by ``text``."""
    head, found_start, rest = page.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found_start or not found_end:
        raise SystemExit(f"{name}: the markers {start!r} and {end!r} are missing")
    return f"{head}{start}\n{text}\n{end}{tail}"


def cli(argv, description: str, page: Path, start: str, end: str, render, source: str) -> int:
    """Rewrite ``page``'s table from ``render()``; ``--check`` exits 1 where it differs, ``--print`` prints it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--check", action="store_true", help=f"exit 1 if {page.name}'s table differs from {source}")
    p.add_argument("--print", action="store_true", help=f"print the table instead of writing {page.name}")
    args = p.parse_args(argv)
    text = render()
    if args.print:
        print(text)
        return 0
    current = page.read_text()
    wanted = splice(current, text, start, end, str(page.relative_to(REPO)))
    if args.check:
        if current != wanted:
            print(f"{page.relative_to(REPO)}: the table differs from {source}; regenerate it with "
                  f"`python bench/{Path(sys.argv[0]).name}`", file=sys.stderr)
            return 1
        return 0
    page.write_text(wanted)
    return 0
