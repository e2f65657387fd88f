"""posctl's table layout: tables that fit the terminal, or one block per record.

A table never truncates a value. Each column is a number (right-aligned, never wrapped), a short
text (never wrapped either: symbols, statuses), free text that wraps at spaces (reasons, times)
or an identifier that may fold anywhere (position keys). The widths are computed here, not left
to rich (whose last resort cuts every column evenly): numbers and short texts get their full
width, free text and identifiers share what is left down to a floor. When even that does not
fit the terminal, the table folds into one block per record (``label value`` pairs that wrap
between pairs, never inside a number). The columns themselves are in :mod:`positiond.ctl.render`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Col", "Kind", "Row", "layout"]

# Free text keeps at least this many columns (or its longest word, if longer) in a table.
WRAP_FLOOR = 10
# An identifier (a position key) folds anywhere, down to this many columns.
FOLD_FLOOR = 10
# A table row may wrap a cell over at most this many lines (roughly); else blocks.
MAX_LINES = 3
# A block's continuation lines are indented by this much.
INDENT = 4

Row = Mapping[str, Any]
Kind = Literal["num", "text", "wrap", "fold"]


@dataclass(frozen=True)
class Col:
    """One column: its header, how a row shows in it, and how it may be laid out."""

    name: str
    cell: Callable[[Row], Text]
    kind: Kind = "text"  # num: right-aligned, whole; text: whole; wrap: at spaces; fold: anywhere


def _longest_word(text: Text) -> int:
    return max((len(w) for w in text.plain.split()), default=0)


def _widths(cols: Sequence[Col], cells: list[list[Text]], room: int) -> list[int] | None:
    """Content width of each column so the table fits ``room``; None when it cannot."""
    natural = [
        max([len(col.name), *(max((len(line) for line in c[i].plain.splitlines()), default=0)
                              for c in cells)])
        for i, col in enumerate(cols)
    ]  # fmt: skip
    floor = list(natural)
    for i, col in enumerate(cols):
        # A header wraps like free text: its longest word is what it needs.
        header = max((len(w) for w in col.name.split()), default=0)
        if col.kind == "wrap":
            longest = max([_longest_word(c[i]) for c in cells] + [header])
            floor[i] = min(natural[i], max(WRAP_FLOOR, longest))
        elif col.kind == "fold":
            floor[i] = min(natural[i], max(FOLD_FLOOR, header))
    if sum(floor) > room:
        return None
    widths = list(floor)
    spare = room - sum(widths)
    # Give the spare room to the flexible columns, the narrowest first, up to their natural width.
    while spare > 0:
        short = [i for i in range(len(cols)) if widths[i] < natural[i]]
        if not short:
            break
        narrowest = min(widths[i] for i in short)
        for i in short:
            if widths[i] == narrowest and spare > 0:
                widths[i] += 1
                spare -= 1
    # A row several lines tall is harder to read than a block: wrap, but not too much.
    for i in range(len(cols)):
        if widths[i] < natural[i] and any(
            -(-len(c[i].plain) // widths[i]) > MAX_LINES for c in cells
        ):
            return None
    return widths


def _overhead(n: int) -> int:
    """Columns a table of n columns spends on padding and separators (see _build)."""
    return 2 * n - 1 if n else 0


def _build(
    cols: Sequence[Col], cells: list[list[Text]], widths: Sequence[int], title: str | None,
    caption: str | None,
) -> Table:  # fmt: skip
    table = Table(
        title=Text(title, style="bold") if title else None,
        caption=Text(caption) if caption else None,
        title_justify="left",
        caption_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    justify: Literal["left", "right"]
    for col, width in zip(cols, widths, strict=True):
        justify = "right" if col.kind == "num" else "left"
        table.add_column(
            col.name, justify=justify, width=width, no_wrap=col.kind in ("num", "text"),
            overflow="fold",
        )  # fmt: skip
    for row in cells:
        table.add_row(*row)
    return table


def _blocks(
    cols: Sequence[Col], cells: list[list[Text]], width: int, title: str | None,
    caption: str | None,
) -> Group:  # fmt: skip
    """One block per record: the first column on its own line, then ``label value`` pairs packed
    onto indented lines; a line breaks between pairs, so no number is ever split."""
    parts: list[RenderableType] = []
    if title:
        parts.append(Text(title, style="bold"))
    if caption:
        parts.append(Text(caption))
    room = max(width - INDENT, 20)
    wrapper = Console(width=room)
    for row in cells:
        head = row[0].copy()
        head.stylize("bold")
        parts.append(head)
        lines: list[Text] = []
        line = Text()
        for col, cell in zip(cols[1:], row[1:], strict=True):
            pair = Text.assemble((col.name, "dim"), " ", cell)
            if line.plain and len(line) + 2 + len(pair) > room:
                lines.append(line)
                line = Text()
            if line.plain:
                line.append("  ")
            line.append_text(pair)
        if line.plain:
            lines.append(line)
        for full in lines:
            # A pair longer than the line (a long reason) wraps at spaces under the indent.
            for piece in full.wrap(wrapper, room, overflow="fold"):
                parts.append(Text(" " * INDENT) + piece)
    return Group(*parts)


def layout(
    out: Console, cols: Sequence[Col], rows: Sequence[Row], title: str | None = None,
    caption: str | None = None,
) -> RenderableType:  # fmt: skip
    """The rows as a table that fits the console, or as blocks when no table can."""
    cells = [[col.cell(row) for col in cols] for row in rows]
    widths = _widths(cols, cells, out.width - _overhead(len(cols)))
    if widths is None:
        return _blocks(cols, cells, out.width, title, caption)
    return _build(cols, cells, widths, title, caption)
