"""Find MovieLens-100k as RecBole atomic files: local copy, RecBole wheel, or a GroupLens download.

Resolution order (first hit wins):
  1. `data_dir`, else `$LAYERWISE_DATA_DIR`: `ml-100k.inter` in it or in its `ml-100k/` subfolder;
  2. the copy inside the installed RecBole wheel (`pip install --no-deps recbole==1.2.1`);
  3. an earlier download converted into the cache (`$LAYERWISE_CACHE_DIR`, default ~/.cache/layerwise);
  4. a download of the GroupLens zip, converted to atomic files in the cache.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from layerwise.data.atomic import default_cache_dir
from layerwise.data.readers import DataError

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
NAME = "ml-100k"
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def resolve_ml100k(
    data_dir: Path | str | None = None,
    progress: bool = True,
    *,
    url: str = ML100K_URL,
    cache_dir: Path | str | None = None,
    timeout: float = 30.0,
    use_recbole: bool = True,
) -> Path:
    """Return a directory holding `ml-100k.inter` (+ `.item`, `.user`), downloading only as a last resort.

    Args:
        data_dir: a local folder to look in first (default `$LAYERWISE_DATA_DIR`).
        progress: show a tqdm bar while downloading.
        url: where to download the GroupLens zip from.
        cache_dir: where a download is converted to (default `$LAYERWISE_CACHE_DIR` or ~/.cache/layerwise).
        timeout: seconds before a stalled download is given up.
        use_recbole: look for the RecBole wheel's copy.

    Raises:
        DataError: nothing found locally and the download failed; the message says what to install
            or where to put the files.
    """
    found = find_local(data_dir if data_dir is not None else os.environ.get("LAYERWISE_DATA_DIR"))
    if found is None and use_recbole:
        found = find_recbole_copy()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if found is None:
        found = find_local(cache)
    return found if found is not None else download_ml100k(cache, url=url, progress=progress, timeout=timeout)


def find_local(directory: Path | str | None) -> Path | None:
    """The folder holding `ml-100k.inter`: `directory` itself or its `ml-100k/` subfolder, else None."""
    if not directory:
        return None
    for candidate in (Path(directory), Path(directory) / NAME):
        if (candidate / f"{NAME}.inter").is_file():
            return candidate
    return None


def find_recbole_copy() -> Path | None:
    """The RecBole wheel's `dataset_example/ml-100k/`, located without importing recbole.

    `find_spec` on a top-level name only consults the path finders; importing recbole itself would pull
    in its heavy dependencies (which `pip install --no-deps` deliberately leaves out).
    """
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "dataset_example" / NAME
        if all((folder / f"{NAME}.{ext}").is_file() for ext in ("inter", "item", "user")):
            return folder
    return None


def download_ml100k(cache_dir: Path | str, url: str = ML100K_URL, progress: bool = True,
                    timeout: float = 30.0) -> Path:
    """Download the GroupLens zip and convert it to atomic files in `cache_dir/ml-100k/`.

    The folder appears only once complete (built in a temporary sibling, then renamed).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / NAME
    try:
        payload = fetch_url(url, progress, timeout, desc=f"download {NAME}")
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataError(
            f"ml-100k: not found locally and the download from {url} failed ({err}). Either install the "
            f"RecBole wheel, which ships the data set: `pip install --no-deps recbole==1.2.1`; or put "
            f"{NAME}.inter/.item/.user (RecBole atomic files) in a folder and pass it as data_dir or set "
            f"LAYERWISE_DATA_DIR; or place them in {target}."
        ) from err
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=cache_dir))
    try:
        convert_grouplens(payload, tmp, source=url)
        os.replace(tmp, target)
    except OSError:
        if find_local(target) is None:  # not a concurrent download that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_url(url: str, progress: bool, timeout: float, desc: str) -> bytes:
    """The body at `url` (a few MB: ml-100k, the literature's sequence files), read in chunks behind a
    progress bar labelled `desc`."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme chosen by caller)
        total = int(resp.headers.get("Content-Length") or 0) or None
        buf = io.BytesIO()
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            while chunk := resp.read(1 << 16):
                buf.write(chunk)
                bar.update(len(chunk))
    return buf.getvalue()


def convert_grouplens(payload: bytes, out_dir: Path, source: str = "zip") -> None:
    """Write `ml-100k.inter/.item/.user` from the GroupLens zip's `u.data`, `u.item`, `u.genre`, `u.user`.

    The columns follow RecBole's own conversion: titles lose their trailing "(year)", which becomes
    `release_year`; genres are the names of the set flags, space-separated in `class`.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            files = {Path(n).name: n for n in zf.namelist()}
            missing = [f for f in ("u.data", "u.item", "u.genre", "u.user") if f not in files]
            if missing:
                raise DataError(f"{source}: the zip lacks {', '.join(missing)}")
            # GroupLens wrote these files in Latin-1 (e.g. "Misérables").
            text = {f: zf.read(files[f]).decode("latin-1") for f in ("u.data", "u.item", "u.genre", "u.user")}
    except zipfile.BadZipFile as err:
        raise DataError(f"{source}: not a zip file ({err})") from err
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += ["\t".join(line.split()) for line in text["u.data"].splitlines() if line.strip()]
    genres = [line.split("|")[0] for line in text["u.genre"].splitlines() if line.strip()]
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for line in text["u.item"].splitlines():
        if line.strip():
            items.append(_item_row(line.split("|"), genres))
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += ["\t".join(line.split("|")) for line in text["u.user"].splitlines() if line.strip()]
    for ext, lines in (("inter", inter), ("item", items), ("user", users)):
        (out_dir / f"{NAME}.{ext}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _item_row(fields: list[str], genres: list[str]) -> str:
    """One `.item` line from a `u.item` record: id|title|release date|video date|url|19 genre flags."""
    match = _YEAR.match(fields[1])
    title, year = (match.group(1), match.group(2)) if match else (fields[1], fields[2][-4:] or "unknown")
    flags = fields[5:5 + len(genres)]
    classes = " ".join(g for g, flag in zip(genres, flags) if flag.strip() == "1")
    return "\t".join((fields[0], title.replace("\t", " "), year, classes))
