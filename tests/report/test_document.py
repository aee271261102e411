"""The Markdown/HTML report: every section, numbers with CIs, Holm-adjusted p-values, escaping, images."""

from __future__ import annotations

import re

import numpy as np
import pytest

from layerwise.report import SECTIONS, fmt_estimate, fmt_p, write_report
from tests.report.test_plots import curves, importance_scores, noise_results, pareto_points, slice_rows

EVIL = "<script>alert(1)</script>"


def study_results() -> dict:
    rows = [{"name": p["name"], "group": p["group"], "metric": {"mean": 0.07 * p["retention"], "ci95": None},
             "retention": {"mean": p["retention"], "ci95": p["retention_ci95"]},
             "speedup": {"mean": p["speedup"], "ci95": p["speedup_ci95"]}, "p_value": None}
            for p in pareto_points()]
    # With the 0.5 row below, 4 tested rows; Holm: 0.01 x 4 = 0.04, 0.03 x 3 = 0.09, max(0.04 x 2, 0.09), 0.5.
    for row, p in zip(rows[2:5], (0.01, 0.04, 0.03)):
        row["p_value"] = p
    rows.append({"name": EVIL, "metric": {"mean": 0.05, "ci95": [0.04, 0.06]}, "p_value": 0.5})
    return {
        "title": "ml-100k | llama 8 layers",
        "protocol": {"dataset": "ml-100k", "fingerprint": "ab12", "ranking": "full", "seeds": [0, 1, 2, 3, 4]},
        "headline": {"metric": "ndcg@10", "k": 2, "n_layers": 8,
                     "teacher": {"mean": 0.0712, "ci95": [0.0650, 0.0771]},
                     "compact": {"mean": 0.0663, "ci95": [0.0601, 0.0720]},
                     "retention": {"mean": 0.931, "ci95": [0.902, 0.958]},
                     "speedup": {"batch=1": {"mean": 3.41, "ci95": [3.30, 3.52], "bound": 3.60, "ceiling": 3.72,
                                             "ceiling_ci95": [3.61, 3.80]},
                                 "batch=64": {"mean": 3.02, "ci95": [2.95, 3.10], "bound": 3.51}},
                     "test": {"test": "wilcoxon", "p_value": 0.0032, "n": 943, "effect_size": -0.12},
                     "targets": {"retention": {"min": 0.90}, "speedup": {"of_bound": 0.90}}},
        "baselines": {"metric": "ndcg@10", "reference": "ours k=2", "rows": rows},
        "ablation": {"metric": "ndcg@10", "reference": "full", "rows": [
            {"name": "no bridges", "metric": {"mean": 0.060, "ci95": [0.055, 0.065]}, "p_value": 0.002,
             "p_holm": 0.004}]},
        "k_sweep": {"metric": "ndcg@10", "n_layers": 8, "curves": curves()},
        "robustness": {"metric": "ndcg@10", "kinds": noise_results()},
        "scenarios": {"metric": "ndcg@10", "min_users": 20, "n_dropped": 24, "rows": slice_rows()},
        "importance": {"scores": importance_scores(8), "kept": [0, 2],
                       "dependency": np.random.default_rng(0).normal(0, 0.01, (8, 8))},
        "notes": ["Speed measured on 2 CPU threads."],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(study_results(), out)
    return out, paths, paths["markdown"].read_text(), paths["html"].read_text()


def test_every_section_and_figure_is_there(report):
    out, paths, md, page = report
    for section in SECTIONS:
        assert f"\n## {section}\n" in md and f"<h2>{section}</h2>" in page
    assert set(paths["figures"]) == {"importance", "dependency", "pareto", "k_sweep", "robustness", "slices"}
    for name, path in paths["figures"].items():
        assert path.is_file() and path.parent == out / "figures"
        assert f"](figures/{name}.png)" in md and f'<img src="figures/{name}.png"' in page
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave nothing


def test_numbers_come_with_their_confidence_intervals(report):
    _, _, md, page = report
    for text in ("93.1% [90.2%, 95.8%]", "3.41x [3.30x, 3.52x]", "0.0712 [0.0650, 0.0771]"):
        assert text in md and text in page
    assert "p = 0.0032" in md and "rank-biserial r = -0.120" in md
    assert "Target retention 90.0% (as configured): met" in md  # CI low 90.2% >= 90%
    # Speed against each batch size's own Amdahl bound, never a fixed multiple of the layer count.
    assert "Target speedup (k = 2 of 8 layers, batch=1): 90% of its Amdahl bound 3.60x, 3.24x: met" in md
    assert "Target speedup (k = 2 of 8 layers, batch=64): 90% of its Amdahl bound 3.51x, 3.16x: not met" in md
    assert "95% of the bound" in md and "86% of the bound" in md  # 3.41 / 3.60, 3.02 / 3.51
    # Beside the bound, what the teacher's own 2 layers reached in the same benchmark (only batch 1 has it).
    assert "95% of the bound; the teacher's own 2 layers, timed beside it, 3.72x [3.61x, 3.80x]." in md
    assert "86% of the bound." in md
    assert re.search(r"\| ShortGPT \| 0\.0560 \| 80\.\d% \[", md)


def test_holm_is_computed_across_the_table_when_absent(report):
    _, _, md, _ = report
    cells = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert cells["random"].endswith("| 0.010 | 0.040 |")
    assert cells["uniform"].endswith("| 0.040 | 0.090 |") and cells["first-k"].endswith("| 0.030 | 0.090 |")
    assert cells["ours k=2"].endswith("| - | - |")  # the reference is not tested against itself
    assert cells["no bridges"].endswith("| 0.002 | 0.004 |")  # a given p_holm is kept


def test_text_is_escaped(report):
    _, _, md, page = report
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in md
    assert md.splitlines()[0] == "# ml-100k \\| llama 8 layers"  # a pipe is escaped in Markdown
    assert "<title>ml-100k | llama 8 layers</title>" in page


def test_missing_sections_still_have_their_heading(tmp_path):
    paths = write_report({}, tmp_path)
    md = paths["markdown"].read_text()
    assert all(f"## {s}" in md for s in SECTIONS) and md.count("Not available in this study.") == len(SECTIONS)
    assert paths["figures"] == {} and not (tmp_path / "figures").exists()


def test_embedded_images_make_one_self_contained_page(tmp_path):
    results = {"importance": {"scores": importance_scores(6)}}
    page = write_report(results, tmp_path, embed_images=True)["html"].read_text()
    assert '<img src="data:image/png;base64,iVBOR' in page and 'src="figures/' not in page


def test_formatting_helpers():
    assert fmt_estimate({"mean": 0.5, "ci95": [0.4, 0.6]}, "pct") == "50.0% [40.0%, 60.0%]"
    assert fmt_estimate({"mean": 0.5, "ci95": [float("nan"), float("nan")]}) == "0.5000"
    assert fmt_estimate(None) == "-"
    assert [fmt_p(p) for p in (0.5, 0.0032, 1e-7, None)] == ["0.500", "0.0032", "<1e-04", "-"]


def test_an_older_report_with_fixed_target_ranges_still_renders(tmp_path):
    results = study_results()
    results["headline"]["targets"] = {"retention": [0.88, 0.92], "speedup": [3.5, 4.0]}
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "Target retention 88.0%-92.0%: met" in md  # CI low 90.2% >= 88%
    assert "Target speedup 3.50x-4.00x: inconclusive" in md  # CI [3.30, 3.52] straddles 3.5


def test_stages_that_have_not_finished_are_named_and_given_no_figure(tmp_path):
    """The "Not finished" section lists the plan's unfinished stages; the ablation section names its missing
    components; the k sweep shows "not finished" where a selector's figure at a planned k would stand, also
    for a selector with no finished point at all."""
    results = study_results()
    sweep = results["k_sweep"]
    first = next(iter(sweep["curves"]))
    done = [int(k) for k in sweep["curves"][first]["k"]]
    later = max(done) + 1
    record = {"plan": "studies/s.yaml seeds=[0,1]", "stages": [
        {"seed": 0, "stage": "ablation-items", "state": "started"},
        {"seed": 0, "stage": f"sweep-{first}-k{later}", "state": "pending"},
        {"seed": 0, "stage": "sweep-fisher-k2", "state": "pending"}],
        "ablation": ["items"], "k_sweep": {first: [later], "fisher": [2]}, "finished_after": ["seed-1/noise"]}
    results.update(unfinished=record, ablation={**results["ablation"], "unfinished": ["items"]},
                   k_sweep={**sweep, "unfinished": record["k_sweep"]})
    md = write_report(results, tmp_path)["markdown"].read_text()
    section = {name: md.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0] for name in ("Not finished", "Ablation", "k sweep")}
    assert "studies/s.yaml seeds=[0,1]" in section["Not finished"]
    assert "| 0 | ablation-items | started |" in section["Not finished"]
    assert "were computed, so not in them either: seed-1/noise." in section["Not finished"]
    assert "Not finished: items." in section["Ablation"]
    header = next(line for line in section["k sweep"].splitlines() if line.startswith("| k |"))
    columns = [c.strip() for c in header.strip("| ").split("|")]
    rows = {int(r[0]): r for r in ([c.strip() for c in line.strip("| ").split("|")]
                                   for line in section["k sweep"].splitlines() if re.match(r"\| \d+ \|", line))}
    own, never = columns.index(f"{first}: NDCG@10 retention"), columns.index("fisher: NDCG@10 retention")
    assert rows[later][own] == "not finished" and rows[2][never] == "not finished"
    assert all(row[never] == "-" for k, row in rows.items() if k != 2)  # never run, and not planned there
    assert all("%" in rows[k][own] for k in done)

    finished = write_report({"unfinished": {**record, "stages": []}}, tmp_path / "all")["markdown"].read_text()
    assert "Every stage of the plan (studies/s.yaml seeds=[0,1]) has finished." in finished
