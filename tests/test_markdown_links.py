"""Every relative link in the repository's Markdown resolves: the file (or directory) exists and
an anchor names a heading of that file, by GitHub's slug rules; in-page ``(#anchor)`` links too.

External links (``http:``, ``mailto:``, ...) are not fetched. Links inside fenced code blocks and
inline code are not links. The checker is tried first on a small tree with known bad links, so
that a checker that finds nothing cannot pass unnoticed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache",
             ".hypothesis", "build", "dist"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    """Every ``*.md`` under root, outside virtualenvs, VCS and tool caches."""
    return sorted(
        p for p in root.rglob("*.md")
        if not any(part in SKIP_DIRS for part in p.relative_to(root).parts)
    )


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0] * len(opened.group(1))
            continue
        if fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            continue
        yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lowercased, every character that
    is not a letter, digit, space, ``-`` or ``_`` dropped, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a file offers: its headings' slugs (repeats get -1, -2, ... as on GitHub)
    and explicit ``<a id=...>`` / ``<a name=...>`` targets."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(_HTML_ANCHOR.findall(line))
    return found


def links(text: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every inline or reference-style link in the prose."""
    for number, line in prose_lines(text):
        reference = _REFERENCE.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            yield number, target


def broken_links(root: Path) -> list[str]:
    """One line per relative link under root that leads nowhere: ``file:line: target: why``."""
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in cache:
            cache[path] = anchors(path.read_text(encoding="utf-8"))
        return cache[path]

    for md in markdown_files(root):
        for number, target in links(md.read_text(encoding="utf-8")):
            if not target or _SCHEME.match(target):
                continue  # external (http:, https:, mailto:): not checked here
            where = f"{md.relative_to(root)}:{number}: {target}"
            path_part, _, anchor = target.partition("#")
            dest = md if not path_part else (md.parent / path_part).resolve()
            if not dest.exists():
                problems.append(f"{where}: no such file")
                continue
            if not anchor:
                continue
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into something that is not Markdown")
            elif anchor not in anchors_of(dest):
                problems.append(f"{where}: no heading with that anchor in {dest.name}")
    return problems


# ---- the checker itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("When the database file is damaged or gone", "when-the-database-file-is-damaged-or-gone"),
        ("4. Event types (`position_events.event_type`) and their payloads",
         "4-event-types-position_eventsevent_type-and-their-payloads"),
        ("### `strategy_sessions`".lstrip("# "), "strategy_sessions"),
        ("posctl — the operator's tool", "posctl--the-operators-tool"),
        ("1.5 CURVE on tcp://", "15-curve-on-tcp"),
        ("A crash day, step by step", "a-crash-day-step-by-step"),
        ("See [the guide](docs/X.md) now", "see-the-guide-now"),
    ],
)
def test_slugs_follow_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_the_checker_finds_every_kind_of_broken_link(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "GUIDE.md").write_text(
        "# Guide\n\n## Step one\n\n## Step one\n\n<a id=\"custom\"></a>\ntext\n"
    )
    (tmp_path / "README.md").write_text(
        "# Top\n\n## A section, with: punctuation!\n\n"
        "good: [g](docs/GUIDE.md) [g](docs/GUIDE.md#step-one) [g](docs/GUIDE.md#step-one-1)\n"
        "good: [g](docs/GUIDE.md#custom) [g](#a-section-with-punctuation) [d](docs/)\n"
        "good: [web](https://example.com/x#y) `[not a link](nowhere.md)`\n"
        "bad file: [b](docs/MISSING.md)\n"
        "bad anchor: [b](docs/GUIDE.md#step-two)\n"
        "bad in-page: [b](#no-such-section)\n"
        "bad anchor into a directory: [b](docs/#x)\n"
        "```\n[in code](also-missing.md)\n```\n"
        "[ref]: docs/GONE.md\n"
    )
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "IGNORED.md").write_text("[x](nope.md)\n")

    problems = broken_links(tmp_path)

    assert [p.split(": ", 1)[0] for p in problems] == ["README.md:8", "README.md:9", "README.md:10",
                                                        "README.md:11", "README.md:15"]
    assert "docs/MISSING.md: no such file" in problems[0]
    assert "docs/GUIDE.md#step-two: no heading" in problems[1]
    assert "#no-such-section: no heading with that anchor in README.md" in problems[2]
    assert "docs/#x: an anchor into something that is not Markdown" in problems[3]
    assert "docs/GONE.md: no such file" in problems[4]


# ---- the repository ----------------------------------------------------------------------------


def test_every_relative_link_in_the_repository_resolves() -> None:
    files = markdown_files(ROOT)
    assert ROOT / "README.md" in files and len(files) > 5
    assert broken_links(ROOT) == []
