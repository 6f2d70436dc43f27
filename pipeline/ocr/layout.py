"""Lines of text in reading order: top to bottom, and left to right within a row.

Two lines share a row when their vertical extents overlap by at least half of
the shorter one's height (a word split off the same line of a sign); rows are
ordered by their top, the lines of a row by their left edge. The text of an
image is its rows joined by newlines, the lines of a row by one space. This is
the reading order of single-column text (signs, labels, slides, receipts);
multi-column pages read row by row across the columns.
"""

from __future__ import annotations

from typing import Sequence


def _extent(box: Sequence[float]) -> tuple[float, float, float]:
    """(top, bottom, left) of a box given as x1, y1, ... x4, y4."""
    ys, xs = box[1::2], box[0::2]
    return min(ys), max(ys), min(xs)


def reading_order(lines: Sequence) -> list[list]:
    """``lines`` (objects with ``.box``: 8 floats) grouped into rows, each row left to right."""
    rows: list[list] = []
    for line in sorted(lines, key=lambda item: _extent(item.box)[0]):
        top, bottom, _ = _extent(line.box)
        for row in rows:
            row_top, row_bottom = min(_extent(x.box)[0] for x in row), max(_extent(x.box)[1] for x in row)
            overlap = min(bottom, row_bottom) - max(top, row_top)
            if overlap >= 0.5 * min(bottom - top, row_bottom - row_top):
                row.append(line)
                break
        else:
            rows.append([line])
    return [sorted(row, key=lambda item: _extent(item.box)[2]) for row in rows]


def joined_text(rows: list[list]) -> str:
    return "\n".join(" ".join(line.text for line in row) for row in rows)
