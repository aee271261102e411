"""The README and docs/ hold together: every relative link resolves, every module and repository file they
name in code exists, and the README stays a front door.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[(?:[^\]\n]|\\\])*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links there are not links)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(_CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _heading_lines(page: Path) -> list[str]:
    headings, in_fence = [], False
    for line in page.read_text().splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line)):
            headings.append(m.group(1))
    return headings


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings give, with GitHub's -1, -2 suffixes on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _heading_lines(page):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    """The page's link targets that point inside the repository (no scheme, no mailto)."""
    targets = []
    for line in _prose_lines(page.read_text()):
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                targets.append(target)
    return targets


def named_paths(page: Path) -> tuple[list[str], list[str]]:
    """Modules (`layerwise.x.y`, `orchestration.x`) and repository files (`benchmarks/x.py`) the page names
    in inline code. Placeholders (`teacher-NAME.json`, `*`, `<name>`) and run outputs (`runs/...`) are
    left out."""
    modules, files = [], []
    for span in _CODE_SPAN.findall(page.read_text()):
        for token in re.findall(r"[\w./*<>~-]+", span):
            if re.fullmatch(r"(layerwise|orchestration)(\.\w+)+", token):
                modules.append(token)
            elif ("/" in token and re.search(r"\.(py|ya?ml|json|sh|md|txt)$", token)
                  and not re.search(r"[A-Z]{3,}|[*<>~]|^runs/|^/", token)):
                files.append(token)
    return modules, files


def module_exists(dotted: str) -> bool:
    """Whether `a.b.c` names a module or package in the repository, or an attribute of a package's own
    module (`layerwise.data.load_dataset`); attributes themselves are not imported, so not checked."""
    parts, here = dotted.split("."), ROOT
    for depth, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
        else:
            return (here / f"{part}.py").is_file() or depth >= 2
    return True


def test_slug_follows_github():
    assert slug("What the studies found (2 CPU cores)") == "what-the-studies-found-2-cpu-cores"
    assert slug("Serving: `layerwise serve`") == "serving-layerwise-serve"
    assert slug("Sharded importance at 1.5B, on CPU") == "sharded-importance-at-15b-on-cpu"


def test_relative_links_skip_code_and_urls(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](x.md) `[b](y.md)` [c](https://e.org)\n```\n[d](z.md)\n```\n[e](w.md#top)\n")
    assert relative_links(page) == ["x.md", "w.md#top"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading gives #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_module_and_file_exists(page):
    modules, files = named_paths(page)
    missing = [m for m in modules if not module_exists(m)] + [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names what the repository does not hold: {missing}"


def test_module_exists():
    assert module_exists("layerwise.models.lora.merged_weight")
    assert module_exists("orchestration.scale.plan")
    assert not module_exists("layerwise.no_such_module")


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    assert "## Python quickstart" in text
