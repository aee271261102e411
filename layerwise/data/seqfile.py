"""Read the one-line-per-user sequence format of the sequential-recommendation literature.

    1 1 2 3 4 5
    2 6 7 8 9 10 4 11

Each line is `user_id item_id item_id ...`: space-separated non-negative integers, the items oldest first
(the files of S3Rec, CoSeRec, ICLRec and DuoRec: Beauty.txt, Yelp.txt, ...). There are no timestamps, so
the reader gives every interaction its position in the line as its timestamp; the chronological
leave-one-out of `build_sequences` then follows line order exactly (last item test, second-to-last
validation).

Every line is checked; bad input raises `DataError` naming the file, the 1-based line and the problem:
a token that is not a non-negative integer, a user's second line, an empty line, or a user with fewer
than three items (one each for training, validation and test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerwise.data.readers import Interactions, fail

MIN_ITEMS = 3  # one train, one validation and one test item


def read_seqfile(path: Path | str) -> Interactions:
    """Read a one-line-per-user sequence file into an `Interactions` log.

    Args:
        path: the text file (`user item item ...` per line, oldest item first).

    Returns:
        An `Interactions` of n rows (n = total items over all lines): `user` and `item` (n,) canonical
        decimal id strings ("007" reads as "7"), `timestamp` (n,) float64 position of each item within
        its line (0, 1, 2, ...), no rating or metadata.

    Raises:
        DataError: the file is missing, empty, or has a bad line; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    lines = path.read_bytes().splitlines()
    if not lines:
        raise fail(path, "empty file: expected one line per user, 'user_id item_id item_id ...'")
    users: list[str] = []
    items: list[str] = []
    counts: list[int] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        user, line_items = _parse_line(path, lineno, raw)
        if user in first_line:
            raise fail(path, f"user {user} has a second line (the first is line {first_line[user]}); "
                             f"each user's items must be on one line", line=lineno)
        first_line[user] = lineno
        users.append(user)
        items.extend(line_items)
        counts.append(len(line_items))
    sizes = np.asarray(counts, dtype=np.int64)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return Interactions(
        user=np.repeat(np.asarray(users, dtype=object), sizes),
        item=np.asarray(items, dtype=object),
        timestamp=(np.arange(len(items), dtype=np.int64) - starts).astype(np.float64),
    )


def _parse_line(path: Path, lineno: int, raw: bytes) -> tuple[str, list[str]]:
    """One line -> (user id, [item ids]) as canonical decimal strings, or a `DataError` at this line."""
    tokens = raw.split()
    if not tokens:
        raise fail(path, "empty line: expected 'user_id item_id item_id ...'", line=lineno)
    # bytes.isdigit accepts ASCII digits only, so "-3", "1.5", "x" and non-ASCII digits all fail here.
    bad = next((i for i, t in enumerate(tokens) if not t.isdigit()), None)
    if bad is not None:
        what = "user id" if bad == 0 else f"item {bad}"
        shown = tokens[bad].decode("utf-8", errors="backslashreplace")
        raise fail(path, f"{what} {shown!r} is not a non-negative integer", line=lineno)
    user = str(int(tokens[0]))
    if len(tokens) - 1 < MIN_ITEMS:
        raise fail(path, f"user {user} has {len(tokens) - 1} item(s); leave-one-out needs at least "
                         f"{MIN_ITEMS} (train, validation, test)", line=lineno)
    return user, [str(int(t)) for t in tokens[1:]]


def sequence_counts(interactions: Interactions) -> dict[str, int]:
    """Users, distinct items and interactions of a log, as the literature's tables count them."""
    return {"users": len(np.unique(interactions.user.astype(str))),
            "items": len(np.unique(interactions.item.astype(str))),
            "interactions": len(interactions)}
