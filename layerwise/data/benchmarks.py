"""The literature's sequential benchmarks by name: `beauty`, `sports`, `toys`, `yelp`.

    from layerwise.data import load_dataset
    data = load_dataset("beauty", data_dir="../shared/data/amazon-yelp")   # 22,363 users, 12,101 items

They are the one-line-per-user files of S3Rec, CoSeRec, ICLRec and DuoRec (5-core, oldest item first),
read by `layerwise.data.seqfile`. A name resolves to its file in this order (first hit wins):
  1. `data_dir`, else `$LAYERWISE_DATA_DIR`: the file in it or in its `amazon-yelp/` subfolder;
  2. an earlier download in `<cache_dir>/amazon-yelp/` (`$LAYERWISE_CACHE_DIR`, default ~/.cache/layerwise);
  3. a download of the raw file from salesforce/ICLRec at a fixed commit, with a progress bar.
Every file is checked against its published sha256 before it is used. A local file that does not match is
an error (it is never read); a download that does not match is deleted and is an error.

The protocol these papers use is this project's default: leave-one-out on line order, histories of at
most 50 items, full ranking over all items with the user's history excluded; they report
`LITERATURE_METRICS`.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerwise.data.atomic import atomic_path, default_cache_dir
from layerwise.data.movielens import fetch_url
from layerwise.data.readers import DataError, Interactions, fail
from layerwise.data.seqfile import read_seqfile, sequence_counts

ICLREC_COMMIT = "2890e6c3ff6a22c6699fc19cb863b66786c1cde4"
ICLREC_URL = f"https://raw.githubusercontent.com/salesforce/ICLRec/{ICLREC_COMMIT}/data"
FOLDER = "amazon-yelp"
SEQFILE_PREFIX = "seqfile:"
SEQFILE_VERSION = 1  # part of the split cache's key: bump when the reader's output changes
LITERATURE_METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")


@dataclass(frozen=True)
class Benchmark:
    """One published file: its name in ICLRec's `data/`, sha256, and the sizes the papers give."""

    file: str
    sha256: str
    users: int
    items: int
    interactions: int


BENCHMARKS: dict[str, Benchmark] = {
    "beauty": Benchmark("Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
                        22_363, 12_101, 198_502),
    "sports": Benchmark("Sports_and_Outdoors.txt",
                        "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
                        35_598, 18_357, 296_337),
    "toys": Benchmark("Toys_and_Games.txt", "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
                      19_412, 11_924, 167_597),
    "yelp": Benchmark("Yelp.txt", "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed",
                      30_431, 20_033, 316_354),
}


def resolve_benchmark(
    name: str,
    data_dir: Path | str | None = None,
    progress: bool = True,
    *,
    base_url: str = ICLREC_URL,
    cache_dir: Path | str | None = None,
    timeout: float = 30.0,
) -> Path:
    """The checked local path of benchmark `name`'s file, downloading it only as a last resort.

    Args:
        name: one of `BENCHMARKS` ("beauty", "sports", "toys", "yelp").
        data_dir: a local folder to look in first (default `$LAYERWISE_DATA_DIR`).
        progress: show a tqdm bar while downloading.
        base_url: the folder URL the file is downloaded from (`<base_url>/<file>`).
        cache_dir: where a download is kept (default `$LAYERWISE_CACHE_DIR` or ~/.cache/layerwise).
        timeout: seconds before a stalled download is given up.

    Raises:
        DataError: unknown name; a local file whose sha256 differs; or nothing local and the download
            failed or did not match (the message says where to put the file).
    """
    _benchmark(name)  # an unknown name fails here, before any file system or network access
    local = data_dir if data_dir is not None else os.environ.get("LAYERWISE_DATA_DIR")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for directory in (local, cache):
        found = find_benchmark_file(name, directory)
        if found is not None:
            return found
    return download_benchmark(name, cache, base_url=base_url, progress=progress, timeout=timeout,
                              searched=[d for d in (local, cache) if d])


def find_benchmark_file(name: str, directory: Path | str | None) -> Path | None:
    """`directory/<file>` or `directory/amazon-yelp/<file>` after a checksum check, else None.

    Raises:
        DataError: the file is there but its sha256 is not the published one.
    """
    if not directory:
        return None
    bench = _benchmark(name)
    for candidate in (Path(directory) / bench.file, Path(directory) / FOLDER / bench.file):
        if candidate.is_file():
            _check_sha256(candidate, name, sha256_file(candidate),
                          "it was not used: replace it with the original, or remove it to have it downloaded")
            return candidate
    return None


def download_benchmark(name: str, cache_dir: Path | str, base_url: str = ICLREC_URL, progress: bool = True,
                       timeout: float = 30.0, searched: Sequence[Path | str] = ()) -> Path:
    """Download `<base_url>/<file>` into `<cache_dir>/amazon-yelp/<file>` once its sha256 matches.

    The file appears under its final name only when complete and checked; a mismatch leaves nothing.
    `searched`: the folders already looked in, named in the error when the download fails.
    """
    bench = _benchmark(name)
    target = Path(cache_dir) / FOLDER / bench.file
    url = f"{base_url.rstrip('/')}/{bench.file}"
    try:
        payload = fetch_url(url, progress, timeout, desc=f"download {bench.file}")
    except (urllib.error.URLError, OSError, ValueError) as err:
        where = ", ".join(str(d) for d in searched) or "no local folder (none given)"
        raise DataError(
            f"{name}: {bench.file} was not found in {where}, and the download from {url} failed ({err}). "
            f"Put {bench.file} (sha256 {bench.sha256}, from the data/ folder of salesforce/ICLRec at commit "
            f"{ICLREC_COMMIT}) in a folder and pass it as data_dir (--data-dir) or set LAYERWISE_DATA_DIR; "
            f"or place it at {target}."
        ) from err
    with atomic_path(target) as tmp:  # a failed check below deletes the temporary file
        tmp.write_bytes(payload)
        _check_sha256(url, name, hashlib.sha256(payload).hexdigest(), f"it was not kept (nothing at {target})")
    return target


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sequence_source(spec: str, data_dir: Path | str | None,
                    progress: bool) -> tuple[str, dict, Callable[[], Interactions]]:
    """`load_dataset`'s hook for a benchmark name or `seqfile:PATH`.

    Returns:
        (data set name, JSON-able cache key, reader). The key holds the file's sha256, so an edited file
        is re-read and a moved one is not. A relative PATH not found as given is looked up in `data_dir`.
    """
    if spec in BENCHMARKS:
        path, name = resolve_benchmark(spec, data_dir, progress=progress), spec
    else:
        path = Path(spec.removeprefix(SEQFILE_PREFIX))
        if not path.exists() and data_dir is not None and (Path(data_dir) / path).exists():
            path = Path(data_dir) / path
        if not path.is_file():
            raise fail(path, f"file not found (from {spec!r}: expected {SEQFILE_PREFIX}PATH to a sequence file)")
        name = path.stem
    key = {"kind": "seqfile", "version": SEQFILE_VERSION, "sha256": sha256_file(path)}
    return name, key, lambda: read_seqfile(path)


def is_sequence_spec(spec: str) -> bool:
    """True for a benchmark name or a `seqfile:PATH` spec (what `sequence_source` takes)."""
    return spec in BENCHMARKS or spec.startswith(SEQFILE_PREFIX)


def benchmark_stats(names: Sequence[str] = tuple(BENCHMARKS), data_dir: Path | str | None = None,
                    progress: bool = True, **resolve: object) -> list[dict]:
    """Users, items and interactions of each benchmark as read, beside the published figures.

    Args:
        names: which benchmarks, in order.
        data_dir, progress, resolve: passed to `resolve_benchmark` (base_url, cache_dir, timeout).

    Returns:
        One dict per name: name, file, path, users, items, interactions, and `published` (the papers'
        users/items/interactions) with `matches` True when the two agree.
    """
    rows = []
    for name in names:
        bench = _benchmark(name)
        path = resolve_benchmark(name, data_dir, progress, **resolve)
        counts = sequence_counts(read_seqfile(path))
        published = {"users": bench.users, "items": bench.items, "interactions": bench.interactions}
        rows.append({"name": name, "file": bench.file, "path": str(path), **counts, "published": published,
                     "matches": counts == published})
    return rows


def format_stats_table(rows: Sequence[dict]) -> str:
    """A Markdown table `| file | users | items | interactions |` of `benchmark_stats` rows."""
    lines = ["| file | users | items | interactions |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['file']} | {r['users']:,} | {r['items']:,} | {r['interactions']:,} |" for r in rows]
    return "\n".join(lines)


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _check_sha256(where: Path | str, name: str, actual: str, consequence: str) -> None:
    expected = BENCHMARKS[name].sha256
    if actual != expected:
        raise DataError(f"{where}: sha256 {actual} does not match the published {expected} of {name} "
                        f"({BENCHMARKS[name].file}); {consequence}")
