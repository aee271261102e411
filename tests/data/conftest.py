"""Shared helpers for the data-layer tests: tiny hand-written files in tmp_path."""

from pathlib import Path

import pytest

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def tiny_atomic(tmp_path: Path) -> Path:
    """Folder `tiny/` with tiny.inter/.item/.user: users a, b (kept) and c (too short)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    write_lines(folder / "tiny.inter", [
        INTER_HEADER,
        "a\t9\t4\t3",
        "a\t2\t5\t1",
        "b\t3\t3\t5",
        "a\t10\t2\t2",
        "b\t30\t1\t5",  # same time as b's item 3: file order decides (3 first)
        "c\t5\t3\t1",
        "a\t1\t4\t4",
        "b\t4\t5\t6",
        "c\t6\t3\t2",
    ])
    write_lines(folder / "tiny.item", [
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "1\tAlpha\t1990\tDrama",
        "2\tBeta\t1991\tComedy Drama",
        "9\tGamma\t1992\t",
    ])
    write_lines(folder / "tiny.user", [
        "user_id:token\tage:token\tgender:token",
        "a\t24\tM",
        "b\t53\tF",
    ])
    return folder
