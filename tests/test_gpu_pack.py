"""The GPU check's packing (benchmarks/gpu_pack.py) and its other end (benchmarks/gpu_stage.py): files cut into
parts that fit a call, grouped into calls, and joined again from whichever parts arrived, each file checked."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_pack  # noqa: E402  (a script folder, not a package)
import gpu_stage  # noqa: E402


@pytest.fixture
def files(tmp_path):
    """Two wheels and a large file, in stream order: 3 + 5 + 20 bytes."""
    made = []
    for name, size in (("a-1-py3-none-any.whl", 3), ("b-1-py3-none-any.whl", 5), ("llm_x-1-py3-none-any.whl", 20)):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes(range(size)) if size < 256 else b"x" * size)
        made.append(path)
    return made


def test_files_are_cut_into_parts_that_fit_and_joined_from_those_that_arrived(tmp_path, files):
    manifest = gpu_pack.cut(files, tmp_path / "pack", part_bytes=6)
    assert [p["bytes"] for p in manifest["parts"]] == [6, 6, 6, 6, 4]
    stage = tmp_path / "stage"
    stage.mkdir()
    for part in ("part-1", "part-2"):  # the wheels end in part 2 (bytes 0-7)
        shutil.copytree(tmp_path / "pack" / part, stage / part)
    ready, missing = gpu_stage.whole_files(stage, gpu_stage.manifest(stage))
    assert [f["name"] for f in ready] == ["a-1-py3-none-any.whl", "b-1-py3-none-any.whl"]
    assert missing == ["llm_x-1-py3-none-any.whl"]
    for part in ("part-3", "part-4", "part-5"):
        shutil.copytree(tmp_path / "pack" / part, stage / part)
    pack = gpu_stage.manifest(stage)
    ready, missing = gpu_stage.whole_files(stage, pack)
    assert not missing
    assert [gpu_stage.read_range(stage, pack, f["offset"], f["bytes"]) for f in ready] == [f.read_bytes() for f in files]


def test_a_part_of_another_pack_is_not_joined(tmp_path, files):
    """A part left in the stage by an earlier pack (other files, the same sizes) is not taken for this one's."""
    gpu_pack.cut(files, tmp_path / "new", part_bytes=14)
    files[-1].write_bytes(b"y" * 20)  # another SmolLM2 wheel of the same size
    gpu_pack.cut(files, tmp_path / "old", part_bytes=14)
    stage = tmp_path / "stage"
    shutil.copytree(tmp_path / "new" / "part-1", stage / "part-1")
    shutil.copytree(tmp_path / "old" / "part-2", stage / "part-2")
    pack = json.loads((stage / "part-1" / "manifest.json").read_text())
    assert gpu_stage.arrived(stage, pack) == [True, False]
    assert gpu_stage.whole_files(stage, pack)[1] == ["llm_x-1-py3-none-any.whl"]


def test_parts_are_grouped_into_calls_that_fit_and_the_last_call_runs_the_check():
    mib = gpu_pack.MIB
    assert gpu_pack.group([10, 10, 10, 4], room=20) == [[0, 1], [2, 3]]
    assert gpu_pack.group([1] * 10, room=100) == [list(range(8)), [8, 9]]  # 8 carried paths at most
    with pytest.raises(ValueError, match="does not fit a call's room"):
        gpu_pack.group([5, 30], room=20)
    calls = gpu_pack.calls_for([14 * mib, 14 * mib, 3 * mib], room=20 * mib)
    assert calls == [
        'run(carry=[".gpu/part-1"], command="bash benchmarks/gpu_check.sh --stage", timeout_s=120)',
        'run(carry=[".gpu/part-2", ".gpu/part-3"], command="bash benchmarks/gpu_check.sh", timeout_s=600)']
