"""Every internal link of the docs resolves (file and anchor), and every `udg` command quoted in a code block
parses: its subcommands exist (their --help is built in process, from the same parser `udg` runs) and every
option it quotes is one of that command's options."""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path

from docsite.generated import ROOT

LINK = re.compile(r"(?<!\!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)"
                  r"|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
PLACEHOLDERS = ("...", "…")
INLINE_COMMAND = re.compile(r"`(udg (?:[^`\n]|\n(?!\s*\n))+)`")  # inline code may wrap, within a paragraph
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def site_slug(heading: str) -> str:
    """The docs site's anchor (Python-Markdown's toc): ASCII only, runs of spaces and hyphens one hyphen."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _without_code(text: str) -> str:
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings that both GitHub and the docs site give the same name."""
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text())):
        if slug(heading) == site_slug(heading):
            found.add(slug(heading))
    return found


def broken_links(pages: list[Path], root: Path = ROOT) -> list[str]:
    """'page: target (why)' for every relative link or image that does not resolve."""
    problems = []
    for page in pages:
        for match in LINK.finditer(_without_code(page.read_text())):
            target = match["target"] or match["image"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # absolute URLs are not the site's to check (and none may be needed offline)
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(root)}: {target}"
            if not resolved.exists():
                problems.append(f"{where} (no such file)")
            elif not str(resolved).startswith(str(root)):
                problems.append(f"{where} (outside the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where} (no heading with this anchor on GitHub and the site alike)")
    return problems


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def quoted_commands(pages: list[Path]) -> list[tuple[Path, list[str]]]:
    """Every `udg ...` command of the pages' code blocks and inline code (continuations joined, comments, env
    assignments and what follows `--` or a `...` placeholder dropped; `a && udg x; udg y` gives both), as its
    words."""
    found = []
    for page in pages:
        text = page.read_text()
        lines = [line for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
        lines += [" ".join(span.split()) for span in INLINE_COMMAND.findall(FENCE.sub("", text))]
        for line in lines:
            try:
                words = _words(line)
            except ValueError:
                continue
            segment: list[str] = []
            for word in [*words, ";"]:
                if word and set(word) <= set(";&|<>()"):
                    _add_command(found, page, segment)
                    segment = []
                else:
                    segment.append(word)
    return found


def _add_command(found: list, page: Path, words: list[str]) -> None:
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words and (words[0] == "udg" or words[0].endswith("/udg")):
        rest = words[1:]
        rest = rest[:rest.index("--")] if "--" in rest else rest
        for stop in PLACEHOLDERS:  # `udg models ...`: checked up to and with the placeholder
            rest = rest[:rest.index(stop) + 1] if stop in rest else rest
        found.append((page, rest))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def bad_commands(pages: list[Path], parser: argparse.ArgumentParser, root: Path = ROOT) -> list[str]:
    """'page: udg ... (why)' for each quoted command whose subcommand or an option does not exist."""
    problems = []
    for page, words in quoted_commands(pages):
        where = f"{page.relative_to(root)}: udg {' '.join(words)}"
        command, path, rest = parser, [], list(words)
        while rest and rest[0] in _subparsers(command):
            path.append(rest[0])
            command = _subparsers(command)[rest.pop(0)]
        if rest and rest[0] in PLACEHOLDERS:
            continue  # any subcommand of it
        if _subparsers(command):
            problems.append(f"{where} (no subcommand {rest[0] if rest else ''!r} of 'udg {' '.join(path)}')")
            continue
        command.format_help()  # what `udg <path> --help` prints
        options = {s for action in command._actions for s in action.option_strings} | {
            s for action in parser._actions for s in action.option_strings}
        for word in rest:
            if word in PLACEHOLDERS:
                break
            if word.startswith("--") and word.split("=", 1)[0] not in options:
                problems.append(f"{where} (no option {word.split('=', 1)[0]} of 'udg {' '.join(path)}')")
    return problems
