"""`udg docs build | check`: regenerate the generated docs (or check that the committed copies are fresh), and
check every link and quoted command of the docs."""

from __future__ import annotations

import argparse


def cmd_build(args: argparse.Namespace) -> int:
    from docsite.generated import ROOT, build, stale, stale_coldstart

    files = build(ROOT, api=not args.no_api)
    old = stale(files)
    coldstart = stale_coldstart(ROOT)
    for path in coldstart:
        print(f"stale: {path.relative_to(ROOT)} (its tables; `udg coldstart ... --summary-only` rewrites it)")
    if coldstart and args.check:
        return 1
    if args.check:
        for path in old:
            print(f"stale: {path.relative_to(ROOT)}")
        if old:
            print("run `udg docs build` and commit the result")
        return 1 if old else 0
    for path in old:
        path.write_text(files[path])
        print(f"written: {path.relative_to(ROOT)}")
    print(f"{len(files)} generated file(s), {len(old)} changed")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from docsite.check import bad_commands, broken_links
    from docsite.generated import ROOT, pages
    from udg_cli import build_parser

    problems = broken_links(pages(ROOT) + [ROOT / "docs" / "api.md"]) + bad_commands(pages(ROOT), build_parser())
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


def register(subparsers) -> None:
    docs = subparsers.add_parser("docs", help="the generated docs: build them, check links and quoted commands")
    commands = docs.add_subparsers(dest="docs_command", required=True, metavar="SUBCOMMAND")
    build = commands.add_parser("build", help="report.md of every committed grid from its journal, the generated "
                                              "sections of the pages, docs/api.md from the OpenAPI document")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed copy is stale")
    build.add_argument("--no-api", action="store_true", help="leave docs/api.md (no serving install here)")
    build.set_defaults(handler=cmd_build)
    check = commands.add_parser("check", help="every internal link (file, anchor) and every quoted `udg` command")
    check.set_defaults(handler=cmd_check)
