"""The repository keeps weights and data out: no tracked file over 3 MB, with one exception, a study archive's
LoRA teacher's own weights (its fp16 adapters and item vectors, which let a study resume on another machine),
at most 12 MB a seed.

    .venv/bin/python -m pytest -q tests/test_repository_files.py
"""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.study.archive import MAX_FILE_BYTES  # the archive keeps no model whole past it

ROOT = Path(__file__).resolve().parent.parent
MAX_TEACHER_BYTES_PER_SEED = 12 * 2**20
LORA_TEACHER_FILES = ("lora.safetensors", "recommender.safetensors")  # adapters, item vectors and head


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.fail(f"this test reads the tracked files with `git ls-files` in {ROOT}: {err}")
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def _lora_teacher_file(path: Path) -> bool:
    """A LoRA teacher's own weights inside a study archive: <archive>/seeds/seed-N/teacher-*/model/<file>,
    next to its lora.safetensors."""
    parts = path.relative_to(ROOT).parts
    return (parts[:2] == ("studies", "archive") and path.name in LORA_TEACHER_FILES
            and path.parent.name == "model" and path.parent.parent.name.startswith("teacher-")
            and (path.parent / "lora.safetensors").is_file())


def oversized(files: list[Path]) -> list[str]:
    """What breaks the rule among `files`, one line each."""
    found, per_seed = [], {}
    for path in files:
        size = path.stat().st_size
        if _lora_teacher_file(path):
            seed = path.parent.parent.parent
            per_seed[seed] = per_seed.get(seed, 0) + size
        elif size > MAX_FILE_BYTES:
            found.append(f"{path.relative_to(ROOT)}: {size:,} bytes (more than {MAX_FILE_BYTES:,})")
    found += [f"{seed.relative_to(ROOT)}: a LoRA teacher of {size:,} bytes (more than {MAX_TEACHER_BYTES_PER_SEED:,})"
              for seed, size in per_seed.items() if size > MAX_TEACHER_BYTES_PER_SEED]
    return found


def test_no_tracked_file_is_over_3_mb_but_an_archived_lora_teachers_weights():
    files = tracked_files()
    assert len(files) > 100  # the listing worked
    assert oversized(files) == []


def test_the_rule_catches_a_big_file_and_a_big_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    big = tmp_path / "studies/archive/s/seeds/seed-0/ours-1/model/recommender.safetensors"
    teacher = tmp_path / "studies/archive/s/seeds/seed-0/teacher-1/model"
    for path, size in ((big, MAX_FILE_BYTES + 1), (teacher / "lora.safetensors", 9 * 2**20),
                       (teacher / "recommender.safetensors", 2 * 2**20)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
    files = [big, teacher / "lora.safetensors", teacher / "recommender.safetensors"]
    message = f"{big.relative_to(tmp_path)}: {MAX_FILE_BYTES + 1:,} bytes (more than {MAX_FILE_BYTES:,})"
    assert oversized(files) == [message]
    (teacher / "lora.safetensors").write_bytes(b"\0" * (11 * 2**20))  # 13 MiB for the seed
    assert oversized(files)[1].startswith("studies/archive/s/seeds/seed-0: a LoRA teacher")
