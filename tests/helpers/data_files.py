"""Small files for reader tests, and the DataError message a bad one raises."""

from pathlib import Path

import pytest

from layerwise.data import DataError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    """The message of the DataError that fn(*args, **kwargs) raises (the test fails if it raises none)."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)
