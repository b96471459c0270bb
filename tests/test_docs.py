"""The README and docs/ stay true: links resolve, and the quickstart's commands are the CLI's.

Docs drift silently: a page is renamed, an option is renamed, and the README still shows the old
spelling. These tests read the Markdown and fail on the first link that does not resolve, the first
quickstart command that is not a command, and the first option the command's --help does not list.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgeq.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# [text](target) and ![alt](target); a target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            found.add(_anchor(m.group(1)))
    return found


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    orphans = [p.name for p in DOCS if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_link_checker_catches_a_broken_link(tmp_path):
    # The checks above must be able to fail: a missing file and a missing heading are both seen.
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[gone](nope.md) [here](#title) [bad](#nowhere)\n```\n[code](skipped.md)\n```\n")
    assert _links(page) == ["nope.md", "#title", "#nowhere"]
    assert _anchors(page) == {"title"}
    assert _anchor("Where the device differs: `--layers N`") == "where-the-device-differs---layers-n"


# ------------------------------------------------------------------ the quickstart against the CLI


def _quickstart_commands() -> list[list[str]]:
    """Every `edgeq ...` command line in a code block of the README's Quickstart sections."""
    commands: list[list[str]] = []
    in_quickstart = fenced = False
    pending = ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_quickstart = line.startswith("## Quickstart")
            continue
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not (in_quickstart and fenced):
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = text.removeprefix("$ ")
        if text.startswith("edgeq "):
            commands.append(shlex.split(text, comments=True))
    return commands


def _help(words: list[str]) -> str:
    result = CliRunner().invoke(main, [*words, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"edgeq {' '.join(words)} --help failed: {result.output}"
    return result.output


def test_the_quickstart_shows_commands_for_a_pi_and_a_microcontroller():
    commands = _quickstart_commands()
    used = {(c[1], c[c.index("-t") + 1]) for c in commands if "-t" in c}
    assert {("convert", "rpi4"), ("convert", "cortex-m4"), ("export", "cortex-m4")} <= used, used
    assert {"convert", "check", "deploy", "export"} <= {c[1] for c in commands}


@pytest.mark.parametrize("argv", _quickstart_commands(), ids=lambda c: " ".join(c[:3]))
def test_every_quickstart_command_and_option_exists(argv):
    name = argv[1]
    ctx = click.Context(main)
    assert name in main.list_commands(ctx), f"README quickstart runs `edgeq {name}`, which is not a command"
    help_text = _help([name])
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
    missing = [word.split("=", 1)[0] for word in argv[2:]
               if word.startswith("-") and word.split("=", 1)[0] not in listed]
    assert not missing, f"`edgeq {name}` --help does not list {missing} (README quickstart: {' '.join(argv)})"


def test_the_targets_table_lists_every_shipped_profile():
    shipped = {p.stem for p in (ROOT / "targets").glob("*.toml") if not p.stem.startswith("_")}
    text = README.read_text(encoding="utf-8")
    section = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"^\| `([\w.-]+)` \|", section, flags=re.M))
    assert in_table == shipped, f"README targets table {sorted(in_table)} vs targets/ {sorted(shipped)}"


# ------------------------------------------------------------------ files the docs name

# A path in backticks that starts at a top-level directory of the repository, e.g. `edgeq/convert/load.py`,
# `tests/test_sweep.py::test_x`, `targets/*.toml`.
REPO_PATH = re.compile(r"`((?:edgeq|deploy|targets|tests|benchmarks|scripts|ansible|examples)/[\w./*-]*)"
                       r"(?:::(\w+)[\w\[\]/-]*)?`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_and_test_named_exists(page):
    missing = []
    for path, test in REPO_PATH.findall(page.read_text(encoding="utf-8")):
        path = path.rstrip(".")
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
        elif not (ROOT / path).exists():
            missing.append(path)
        elif test and not re.search(rf"^\s*def {test}\(", (ROOT / path).read_text(encoding="utf-8"), flags=re.M):
            missing.append(f"{path}::{test}")
    assert not missing, f"{page.name} names files or tests that do not exist: {sorted(set(missing))}"


def _vocabulary_rows() -> list[tuple[list[str], list[str]]]:
    """(options, commands) from the table under "The same word for the same thing" in docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## The same word for the same thing", 1)[1].split("\n## ", 1)[0]
    ctx = click.Context(main)
    names = set(main.list_commands(ctx))
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        options = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", " ".join(re.findall(r"`([^`]*)`", cells[0])))
        commands = [w for w in re.findall(r"[a-z]+", re.sub(r"\([^)]*\)", "", cells[1])) if w in names]
        rows.append((options, commands))
    return rows


def test_the_cli_vocabulary_page_matches_every_command():
    rows = _vocabulary_rows()
    assert len(rows) >= 15, rows
    wrong = []
    for options, commands in rows:
        for name in commands:
            listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", _help([name])))
            wrong += [f"edgeq {name} {opt}" for opt in options if opt not in listed]
    assert not wrong, f"docs/cli.md names options the commands do not have: {wrong}"


def test_every_json_schema_in_the_code_is_documented():
    # Every "edgeq.<kind>/<n>" the code writes has its own section in docs/json.md.
    written = set()
    for top in ("edgeq", "deploy", "ansible"):
        for path in (ROOT / top).rglob("*.py"):
            written |= set(re.findall(r"[\"'](edgeq\.[a-z_.]+/\d+)[\"']", path.read_text(encoding="utf-8")))
    assert {"edgeq.convert/1", "edgeq.deploy/1", "edgeq.sweep/1"} <= written, written
    documented = set(re.findall(r"^## (edgeq\.[a-z_.]+/\d+)$", (ROOT / "docs" / "json.md").read_text(encoding="utf-8"),
                                flags=re.M))
    assert not written - documented, f"schemas without a section in docs/json.md: {sorted(written - documented)}"
