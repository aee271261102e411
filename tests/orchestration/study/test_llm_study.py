"""`layerwise study` on a real pretrained LLM teacher (SmolLM2-135M cut to 3 layers, 40 titled items): the
baselines that start again from the pretrained weights, the item-start ablation with its own teacher, and
the importance stage on a sample of validation users; the sweep's model at another k is timed too."""

import json

import pytest

from orchestration.study.config import load_study_config
from orchestration.study.driver import run_study

SETTINGS = [
    "seeds=[0]", "data.dataset=synthetic:60:40:600:0", "data.max_len=8",
    "teacher.llm.n_layers=3", "teacher.llm.lora_rank=4", "teacher.llm.item_init=title_tokens",
    "teacher.llm.item_scale=row_norm", "teacher.head=cos", "teacher.train.epochs=1", "teacher.train.batch_size=16",
    "compress.keep=2", "compress.selector=topk", "compress.method=block_influence", "compress.ablation_users=20",
    "compress.calib_batches=1", "compress.calib_batch_size=8", "compress.heal.epochs=1", "dependency_users=10",
    "compress.heal.batch_size=16", "compress.heal.prefit_steps=0", "compress.heal.cache_teacher=true",
    "baselines=[truncated,scratch]", "ablation=[heal,items]", "sweep.selectors=[ours]", "sweep.ks=[1]",
    "sweep.heal_epochs=1", "noise.kinds=[drop]",
    "noise.levels=[0.0]", "scenarios.min_users=5", "ray.cpus_per_seed=1", "bench.runs=2", "bench.warmup=1",
    "bench.batch_sizes=[2]", "bench.remeasures=0",
]


@pytest.mark.slow
def test_llm_study_rebuilds_baselines_from_the_pretrained_weights(ray_local, smollm2, tmp_path):
    config = load_study_config(None, [*SETTINGS, f"teacher.pretrained={smollm2.path}", f"run_dir={tmp_path}",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    results = run_study(config, progress=False)
    seed = tmp_path / config.name / "seeds" / "seed-0"
    rows = {r["name"]: r for r in results["baselines"]["rows"]}
    assert {"teacher", "ours", "truncated", "scratch"} <= set(rows)
    # The LoRA teacher is stored in float16, and each stage records the machine and precision it ran with.
    teacher = next(seed.glob("teacher-*"))
    assert json.loads((teacher / "model" / "manifest.json").read_text())["weights_dtype"] == "float16"
    timing = json.loads((teacher / "_seconds.json").read_text())
    assert timing["precision"] == {"teacher": "float32", "heal": "float32"} and timing["torch_threads"] == 1
    assert timing["cpu_kernels"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "SVE")
    truncated = json.loads(next(seed.glob("baseline-truncated-*/rows.json")).read_text())[0]
    scratch = json.loads(next(seed.glob("baseline-scratch-*/rows.json")).read_text())[0]
    assert truncated["n_layers"] == scratch["n_layers"] == 2 and truncated["kept"] == [0, 1]
    assert scratch["training"]["config"]["lr"] == 3e-4 and truncated["training"]["config"]["lr"] == 1e-3
    # The item-start ablation trained its own teacher (items at random) and compressed it the same way.
    items = json.loads(next(seed.glob("ablation-items-*/rows.json")).read_text())[0]
    assert items["row"] == "ours, items started at random" and len(items["kept"]) == 2
    assert 0 <= items["teacher_means"]["ndcg@10"] <= 1 and (next(seed.glob("ablation-items-*")) / "teacher").is_dir()
    assert "ours, items started at random" in {r["name"] for r in results["ablation"]["rows"]}
    # A non-beam selector: the dependency matrix only on the first seed (the heatmap's), on its own 10 users
    # (the importance stage took 20), in a stage of its own after the baselines and noise, so that it holds
    # back none of them.
    record = json.loads(next(seed.glob("importance-*/importance.json")).read_text())
    assert record["ablation_users"] == 20 and "dependency_loss" not in record
    dependency = json.loads(next(seed.glob("dependency-*/dependency.json")).read_text())
    assert dependency["ablation_users"] == 10 and len(dependency["dependency_loss"]) == 3 and results["importance"]["dependency"] == dependency["dependency_loss"]
    order = [p.parent.name.rsplit("-", 1)[0] for p in sorted(seed.glob("*/_seconds.json"), key=lambda p: p.stat().st_mtime)]
    assert order.index("dependency") > max(order.index(name) for name in ("baseline-scratch", "noise"))
    # Our model at the swept k=1 was saved for the speed benchmark and timed beside ours (k=2).
    sweep = json.loads(next(seed.glob("sweep-ours-k1-*/rows.json")).read_text())[0]
    assert sweep["timing"] == "ours k=1" and (next(seed.glob("sweep-ours-k1-*")) / sweep["timing_model"]).is_dir()
    speed = json.loads(next((tmp_path / config.name).glob("speed-*/speed.json")).read_text())
    assert {"teacher", "ours", "ours k=1"} <= set(speed["models"])
    timed = results["k_sweep"]["speedup"]
    assert timed["k"] == [1, 2] and len(timed["batch=2"]) == 2
    assert timed["batch=2"][1] == results["headline"]["speedup"]["batch=2"]  # at the study's k: ours itself
    # Where ours gains or loses against scratch and truncated, on every user and by slice.
    assert {r["rival"] for r in results["rivals"]["rows"]} == {"scratch", "truncated"}
    report = (tmp_path / config.name / "report" / "report.md").read_text()
    assert "speedup (batch=2)" in report.split("## k sweep", 1)[1].split("\n## ", 1)[0]
