"""The docs: generated parts are fresh, every internal link and quoted `udg` command resolves, the site builds
offline with no external resources."""

import re
import subprocess
import sys
import time

import pytest

from docsite.check import bad_commands, broken_links, quoted_commands
from docsite.generated import ROOT, DocsError, build, pages, render_page, stale
from udg_cli import build_parser


def test_generated_files_and_sections_are_fresh():
    files = build(ROOT)
    assert ROOT / "docs" / "api.md" in files and ROOT / "docs" / "results.md" in files
    assert sum(p.name.startswith("report") for p in files) >= 5
    assert stale(files) == [], "stale generated docs: run `udg docs build` and commit the result"


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 8 * 1024
    first = readme.split("```", 2)[1]
    assert first.splitlines()[1].startswith("make run") and first.splitlines()[2].startswith("make test")


def test_every_internal_link_and_quoted_command_resolves():
    docs = pages(ROOT) + [ROOT / "docs" / "api.md"]
    assert broken_links(docs) == []
    assert len(quoted_commands(pages(ROOT))) >= 100
    assert bad_commands(pages(ROOT), build_parser()) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) [anchor](#nope) ![img](x.png) `[not](a.md)`\n\n"
                    "```bash\nREDIS_URL=x udg serve --model-repo m  # a comment\nudg train --epoch 3 && udg nope\n"
                    "udg gc --dry-run; udg report --experiments 'shop/*' --summary-only\n"
                    "udg make-version --repo r -- --anything\n```\n\n"
                    "Inline: `udg models ...`, `udg report --model pnn`, and one that wraps: `udg bench model CK\n"
                    "--rounds 3 --warp 2`.\n\nA new paragraph: `udg\n\nnot a command`.\n")
    links = broken_links([page], tmp_path)
    assert [p.split(": ", 1)[1] for p in links] == ["missing.md (no such file)",
                                                    "#nope (no heading with this anchor on GitHub and the site alike)",
                                                    "x.png (no such file)"]
    commands = bad_commands([page], build_parser(), tmp_path)
    assert len(commands) == 4
    assert "udg report --model pnn (no option --model of 'udg report')" in commands[2]
    assert "udg bench model CK --rounds 3 --warp 2 (no option --warp of 'udg bench model')" in commands[3]
    assert "udg train --epoch 3 (no option --epoch of 'udg train')" in commands[0]
    assert "(no subcommand 'nope' of 'udg ')" in commands[1]


def test_include_sections_take_a_reports_table(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("### t\n\n| model | x |\n|---|---:|\n| PNN | 1 |\n| DIN | 2 |\n\ntext\n\n| a |\n|---|\n| b |\n")
    page = "before\n<!-- generated: include report.md table=1 rows=DIN -->\nold\n<!-- end generated -->\nafter\n"
    assert render_page(page, tmp_path) == ("before\n<!-- generated: include report.md table=1 rows=DIN -->\n"
                                           "| model | x |\n|---|---:|\n| DIN | 2 |\n<!-- end generated -->\nafter\n")
    assert "| b |" in render_page(page.replace("table=1 rows=DIN", "table=2"), tmp_path)
    for bad, message in (("table=3", "has 2 table"), ("table=1 rows=DIEN", "no row"), ("tabel=1", "unknown"),
                         ('line="load average"', "no line"), ("line=text table=1", "not a table"),
                         ("lines=| table=1", "not a table"), ("lines=zz", "no line")):
        with pytest.raises(DocsError, match=message):
            render_page(page.replace("table=1 rows=DIN", bad), tmp_path, where="page.md")
    # a run's machine line beside its table: the first line with the prefix, quoted whole
    assert render_page(page.replace("table=1 rows=DIN", "line=te"), tmp_path).split("\n")[2] == "text"
    # a run's target lines: every line with the prefix, in order
    assert render_page(page.replace("table=1 rows=DIN", "lines=|"), tmp_path).split("\n")[2:11] == [
        "| model | x |", "|---|---:|", "| PNN | 1 |", "| DIN | 2 |", "| a |", "|---|", "| b |",
        "<!-- end generated -->", "after"]


def test_the_site_builds_strict_and_offline(tmp_path):
    started = time.perf_counter()  # mkdocs-material: the docs extra, installed by `make test`
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - started < 60
    html = {p: p.read_text() for p in (tmp_path / "site").rglob("*.html")}
    assert any(p.name == "index.html" and "results" in p.parent.name for p in html) or len(html) >= 10
    # Nothing the pages load comes from the network: no fonts, scripts or styles from a CDN.
    for path, text in html.items():
        remote = re.findall(r"""<(?:link|script|img)[^>]+(?:href|src)=["']?(?:https?:)?//[^"' >]+""", text)
        assert remote == [], (path, remote[:3])
