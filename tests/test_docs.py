"""The README and docs/ stay true to the tree: every relative link leads to a file (and heading)
that exists, and every command they quote names a subcommand, script and flags that exist."""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from medal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(h) for h in _HEADING.findall(text)}


def _links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.name})")
    assert not broken, f"{doc.name}: broken links: {broken}"


def _commands(text: str) -> list[str]:
    """Shell commands quoted in fenced blocks (continuation lines joined, comments dropped) and
    in inline code spans."""
    out = []
    for block in _FENCE.findall(text):
        out += [ln.split(" #")[0].strip() for ln in block.replace("\\\n", " ").splitlines()]
    out += [" ".join(c.split()) for c in _INLINE.findall(_FENCE.sub("", text))]
    return [c for c in out if c]


def _medal_argv(command: str) -> list[str] | None:
    """The arguments after ``medal`` / ``python -m medal`` in a quoted command, or None."""
    m = re.search(r"(?:^|/|&&\s*|;\s*)(?:medal|python3? -m medal)\s+([a-z-].*)$", command)
    if not m:
        return None
    try:
        return shlex.split(m.group(1).replace("|", " ").replace("$", ""))
    except ValueError:
        return m.group(1).split()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _medal_problems(doc: Path) -> list[str]:
    subs = _subparsers()
    problems = []
    for command in _commands(doc.read_text(encoding="utf-8")):
        argv = _medal_argv(command)
        if not argv:
            continue
        positional = [t for t in argv if not t.startswith("-")]
        name = argv[0] if argv[0] in subs else None
        if name is None:
            if argv[0] not in ("-c", "--config") and re.fullmatch(r"[a-z]+", argv[0]):
                problems.append(f"{command!r}: no subcommand {argv[0]!r}")
            name = next((t for t in positional if t in subs), None)
            if name is None:
                continue
        parser = subs[name]
        flags = _flags(parser)
        for token in argv:
            flag = token.split("=")[0]
            if re.fullmatch(r"--?[a-z][a-z-]*", flag) and flag not in flags:
                problems.append(f"{command!r}: 'medal {name}' has no option {flag}")
        if name == "labels":
            action = next(a for a in parser._actions if a.dest == "action")
            rest = positional[positional.index("labels") + 1 :] if "labels" in positional else []
            words = [t for t in rest if re.fullmatch(r"[a-z]+", t)]
            if words and words[0] not in action.choices:
                problems.append(f"{command!r}: 'medal labels' has no action {words[0]!r}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_medal_commands_parse(doc: Path) -> None:
    problems = _medal_problems(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_scripts_and_their_flags_exist(doc: Path) -> None:
    problems = []
    for command in _commands(doc.read_text(encoding="utf-8")):
        for m in re.finditer(r"(scripts/[\w.-]+\.py)((?:\s+[^|;&#]*)?)", command):
            script = ROOT / m.group(1)
            if not script.exists():
                problems.append(f"{command!r}: {m.group(1)} does not exist")
                continue
            source = script.read_text(encoding="utf-8")
            for flag in re.findall(r"(?:^|\s)(--[a-z][a-z-]*)", m.group(2)):
                if flag == "--help" and "argparse" in source:
                    continue  # every argparse parser has it
                if flag == "--set" and "add_overrides_argument(" in source:
                    continue  # medal.config.add_overrides_argument adds it
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    problems.append(f"{command!r}: {m.group(1)} has no option {flag}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """A broken link, an unknown subcommand, an unknown flag and a missing script are found."""
    bad = tmp_path / "bad.md"
    bad.write_text(
        "[x](nowhere.md) [y](#no-such-heading)\n\n# Title\n\n"
        "`medal frobnicate -c c.toml` `medal query -c c.toml --no-such-flag`\n"
        "`medal labels -c c.toml explode` `python scripts/no_such_script.py`\n"
    )
    assert _links(bad) == ["nowhere.md", "#no-such-heading"]
    assert "title" in _anchors(bad) and "no-such-heading" not in _anchors(bad)
    problems = "\n".join(_medal_problems(bad))
    assert "no subcommand 'frobnicate'" in problems
    assert "has no option --no-such-flag" in problems
    assert "has no action 'explode'" in problems
    assert not (ROOT / "scripts/no_such_script.py").exists()
