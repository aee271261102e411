"""A LoRA-trained LLM recommender kept as its adapters alone, and made whole again, digest for digest, from
the pretrained SmolLM2-135M weights: by hand, and as a study archive's teacher stage that a resumed run
needs (2 of its 30 layers, to keep the test small)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from layerwise.data import load_dataset
from layerwise.models.checkpoint import (
    LORA, file_digests, is_stripped, load_recommender, missing_weights, save_recommender, strip_weights,
    weight_digests,
)
from layerwise.models.factory import build_recommender
from layerwise.models.llm import LLMSetup
from layerwise.models.lora import has_lora, merged_weight
from layerwise.models.rebuild import BACKBONE_WEIGHTS, rebuild_backbone, rebuildable
from layerwise.training.train import TrainConfig, next_item_loss, training_windows
from orchestration.pipeline.stages import ArchiveMismatch, Stages
from orchestration.study.archive import archive_study, stripped_needed

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)


def test_merged_weight_is_exact_float64_arithmetic_whatever_the_threads():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 40, generator=generator)
    a, b = torch.randn(8, 40, generator=generator) * 0.1, torch.randn(96, 8, generator=generator) * 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = merged_weight(weight, a, b, 2.0)
        torch.set_num_threads(1)
        one = merged_weight(weight, a, b, 2.0)
    finally:
        torch.set_num_threads(threads)
    # Rank by rank in float64, by hand: every product of two float32 values is exact in float64.
    delta = [[sum(float(b[i, r]) * float(a[r, j]) for r in range(8)) for j in range(40)] for i in range(96)]
    by_hand = (weight.double() + torch.tensor(delta, dtype=torch.float64) * 2.0).float()
    assert torch.equal(one, two) and torch.equal(one, by_hand)
    assert not torch.equal(one, weight) and torch.allclose(one, weight + 2.0 * b @ a, atol=1e-6)


@pytest.fixture(scope="module")
def saved(smollm2, tmp_path_factory):
    """A 2-layer SmolLM2 recommender with rank-4 LoRA, one training step taken (so B is not zero), saved as a
    study's teacher stage would save it: (model in memory, its folder)."""
    data = load_dataset("synthetic:60:40:600:0")
    model = build_recommender(data, "llama", pretrained=str(smollm2.path), dropout=0.0,
                              llm=LLMSetup(n_layers=2, item_init="title_hidden", lora_rank=4)).train()
    inputs, targets = training_windows(data, 12, causal=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    next_item_loss(model, model.encode(inputs[:8]), targets[:8], TrainConfig(), torch.Generator()).backward()
    optimizer.step()
    out = tmp_path_factory.mktemp("lora") / "model"
    save_recommender(model.eval(), out, {"kind": "teacher", "pretrained": str(smollm2.path)})
    return model, out


def test_a_lora_model_saves_its_adapters_and_their_base(saved):
    model, out = saved
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["lora"]
    assert (record["rank"], record["alpha"], record["scaling"]) == (4, 8, 2.0)
    assert record["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(record["base_sha256"]) == 64 and record["base"] == manifest["pretrained"]
    assert has_lora(model) and (out / LORA).is_file()
    # The saved backbone is the base plus the deterministic merge of exactly these adapters.
    reloaded = load_recommender(out)
    layer = model.layers[1].mlp.down_proj
    expected = merged_weight(layer.base_layer.weight, layer.lora_A["default"].weight,
                             layer.lora_B["default"].weight, 2.0)
    assert torch.equal(reloaded.layers[1].mlp.down_proj.weight, expected)


def test_the_adapters_make_the_stripped_backbone_again_digest_for_digest(saved, smollm2, tmp_path):
    _, out = saved
    small = [name for name in file_digests(out) if name != BACKBONE_WEIGHTS]
    copy_dir = strip_weights(out, tmp_path / "kept", keep=tuple(small))
    assert missing_weights(copy_dir) == [BACKBONE_WEIGHTS] and is_stripped(copy_dir) and rebuildable(copy_dir)
    assert weight_digests(copy_dir) == file_digests(out)  # weights.json lists the kept files too
    rebuild_backbone(copy_dir, smollm2.path)
    assert not is_stripped(copy_dir) and file_digests(copy_dir) == file_digests(out)
    assert not rebuildable(copy_dir)  # whole now

    fully = strip_weights(out, tmp_path / "stripped")  # no adapters kept: nothing to rebuild from
    assert not rebuildable(fully)
    with pytest.raises(ValueError, match="no LoRA model stripped of its merged backbone alone"):
        rebuild_backbone(fully, smollm2.path)


def test_a_rebuild_from_another_base_or_other_adapters_is_refused_and_writes_nothing(saved, smollm2, tmp_path):
    _, out = saved
    small = tuple(name for name in file_digests(out) if name != BACKBONE_WEIGHTS)
    wrong_base = strip_weights(out, tmp_path / "a", keep=small)
    manifest = json.loads((wrong_base / "manifest.json").read_text())
    manifest["lora"]["base_sha256"] = "0" * 64
    (wrong_base / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not the one its adapters were trained on"):
        rebuild_backbone(wrong_base, smollm2.path)
    assert missing_weights(wrong_base) == [BACKBONE_WEIGHTS]

    other = strip_weights(out, tmp_path / "b", keep=small)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / LORA))
    name = next(k for k in tensors if k.endswith("lora_B"))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(other / LORA))
    with pytest.raises(ValueError, match="kept weight files are not those"):
        rebuild_backbone(other, smollm2.path)
    assert missing_weights(other) == [BACKBONE_WEIGHTS]


def test_an_archived_lora_teacher_is_rebuilt_not_trained_again(saved, tmp_path):
    _, out = saved
    run = tmp_path / "runs" / "study"
    stage = run / "seeds" / "seed-0" / "teacher-0123456789ab"
    shutil.copytree(out, stage / "model")
    (stage / "rows.json").write_text("[]")
    (stage / "_seconds.json").write_text(json.dumps({"seconds": 60.0, "cpu_seconds": 100.0}))
    (stage / "_DONE").write_text("")
    whole = sum(f.stat().st_size for f in (stage / "model").rglob("*.safetensors"))
    small = whole - (stage / "model" / BACKBONE_WEIGHTS).stat().st_size
    archive = tmp_path / "archive"
    summary = archive_study(run, archive, max_weight_bytes=small + 1024)
    kept = archive / "seeds" / "seed-0" / stage.name
    assert summary["added"] == ["seed-0/" + stage.name]
    assert missing_weights(kept / "model") == [BACKBONE_WEIGHTS] and rebuildable(kept / "model")
    assert summary["bytes"] < small + 3 * 2**20
    assert stripped_needed(archive) == []  # nothing to train again

    def train_again(folder):
        raise AssertionError("a rebuildable stage must not run again")

    resumed = Stages(tmp_path / "resumed", reuse=(archive / "seeds" / "seed-0",))
    assert resumed.run("teacher", "0123456789ab", train_again) == kept  # its results: read where they are
    folder = resumed.run("teacher", "0123456789ab", train_again, complete=True)
    assert folder == tmp_path / "resumed" / stage.name and (folder / "_DONE").exists()
    assert file_digests(folder / "model") == file_digests(stage / "model")
    assert json.loads((folder / "_seconds.json").read_text())["seconds"] == 60.0
    assert resumed.skipped == ["teacher", "teacher"] and resumed.ran == []

    # Adapters that do not give the archived backbone stop the run, and leave no stage behind.
    tampered = tmp_path / "tampered"
    shutil.copytree(archive, tampered)
    weights = tampered / "seeds" / "seed-0" / stage.name / "model" / "weights.json"
    listed = json.loads(weights.read_text())
    listed[BACKBONE_WEIGHTS]["sha256"] = "f" * 64
    weights.write_text(json.dumps(listed))
    again = Stages(tmp_path / "again", reuse=(tampered / "seeds" / "seed-0",))
    with pytest.raises(ArchiveMismatch, match="rebuilt backbone's weights"):
        again.run("teacher", "0123456789ab", train_again, complete=True)
    assert not (tmp_path / "again" / stage.name).exists()


def test_a_whole_model_in_memory_keeps_its_adapters_after_saving(saved, tmp_path):
    model, _ = saved
    twin = copy.deepcopy(model)
    save_recommender(twin, tmp_path / "m", {"kind": "teacher"})
    assert has_lora(twin)
    assert "base" in json.loads((tmp_path / "m" / "manifest.json").read_text())["lora"]
    assert not rebuildable(strip_weights(tmp_path / "m", tmp_path / "s", keep=(LORA, "recommender.safetensors")))


def test_a_teacher_stored_in_float16_is_the_model_loaded_and_rebuilt_anywhere(saved, smollm2, tmp_path):
    """weights_dtype=float16 (a study's LoRA teacher) stores the adapters and the recommender's own weights in
    half precision, merges the backbone from the stored adapters, and loads as float32 with exactly the stored
    values; a stripped copy rebuilds that same backbone, and the caller's model is left unrounded."""
    model, _ = saved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_recommender(model, tmp_path / "half", {"kind": "teacher", "pretrained": str(smollm2.path)},
                           weights_dtype=torch.float16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched
    assert json.loads((out / "manifest.json").read_text())["weights_dtype"] == "float16"
    from safetensors.torch import load_file

    adapters, own = load_file(str(out / LORA)), load_file(str(out / "recommender.safetensors"))
    assert {t.dtype for t in adapters.values()} == {torch.float16}
    assert own["item_embedding.weight"].dtype == torch.float16
    reloaded = load_recommender(out)
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    assert torch.equal(reloaded.item_embedding.weight, own["item_embedding.weight"].float())
    assert not torch.equal(reloaded.item_embedding.weight, model.item_embedding.weight)  # it was rounded
    layer = model.layers[1].mlp.down_proj
    expected = merged_weight(layer.base_layer.weight, adapters["layers.1.mlp.down_proj.lora_A"],
                             adapters["layers.1.mlp.down_proj.lora_B"], 2.0)
    assert torch.equal(reloaded.layers[1].mlp.down_proj.weight, expected)
    # Half the bytes of the float32 files, and a stripped copy rebuilds the same backbone.
    single = save_recommender(model, tmp_path / "single", {"kind": "teacher", "pretrained": str(smollm2.path)})
    assert (out / LORA).stat().st_size < 0.55 * (single / LORA).stat().st_size
    copy_dir = strip_weights(out, tmp_path / "copy", keep=("lora.safetensors", "recommender.safetensors"))
    rebuild_backbone(copy_dir, pretrained=smollm2.path)
    assert file_digests(copy_dir) == file_digests(out)


def test_models_rebuild_makes_a_whole_copy_and_loading_the_stripped_one_says_how(saved, tmp_path, capsys):
    from orchestration.cli.main import main

    _, out = saved
    kept = strip_weights(out, tmp_path / "kept", keep=tuple(n for n in file_digests(out) if n != BACKBONE_WEIGHTS))
    with pytest.raises(ValueError, match=r"layerwise models rebuild .* --out DIR"):
        load_recommender(kept)
    assert main(["models", "rebuild", str(kept), "--out", str(tmp_path / "whole")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "whole")
    assert file_digests(tmp_path / "whole") == file_digests(out) and is_stripped(kept)  # the source is untouched
    assert main(["models", "rebuild", str(kept), "--out", str(tmp_path / "whole")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["models", "rebuild", str(strip_weights(out, tmp_path / "bare")), "--out", str(tmp_path / "x")]) == 2
    assert "cannot be rebuilt" in capsys.readouterr().err and not (tmp_path / "x").exists()
