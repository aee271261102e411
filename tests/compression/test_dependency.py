import copy
import json

import pytest
import torch
import torch.nn as nn

from layerwise.compression.dependency import dependency_matrix
from layerwise.compression.tracing import metric_with_removed, sample_users
from tests.helpers.tiny_models import Shift, calibration_batches, make_identity, shared_trained, tiny_model


class ProjectOut(nn.Module):
    """A stand-in layer that removes the state's component along `direction`: idempotent, so two in a
    row are redundant copies (either one alone does the whole job)."""

    def __init__(self, direction: torch.Tensor):
        super().__init__()
        self.register_buffer("unit", direction / direction.norm())

    def forward(self, hidden, *args, **kwargs):
        return hidden - (hidden @ self.unit).unsqueeze(-1) * self.unit


def _with_inserted(model, after: int, extra: list[nn.Module]):
    """A deep copy of a llama recommender with `extra` layers inserted after layer `after`."""
    model = copy.deepcopy(model)
    layers = list(model.layers)
    model.backbone.layers = nn.ModuleList(layers[: after + 1] + extra + layers[after + 1:])
    model.backbone.config.num_hidden_layers = len(model.backbone.layers)  # LlamaModel slices by it
    return model


def _direction(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(model.hidden_size, generator=generator)


def test_shape_symmetry_and_identity_pairs_are_additive():
    model = tiny_model("llama", n_layers=4)
    make_identity(model, 2)
    batches = calibration_batches(model, shared_trained("llama")[1], n_batches=1)
    d = dependency_matrix(model, batches)
    assert d.shape == (4, 4) and d.dtype == torch.float64
    assert torch.equal(d, d.T)
    assert torch.equal(torch.diagonal(d), torch.zeros(4, dtype=torch.float64))
    # Removing an identity layer changes nothing, so Δ(2, j) = Δ(j) and Δ(2) = 0 exactly.
    assert d[2].abs().max().item() < 1e-12
    assert d[[0, 0, 1], [1, 3, 3]].abs().min().item() > 0  # the real layers do interact


def test_cancelling_updates_interact_negatively():
    trained, data = shared_trained("llama")
    batches = calibration_batches(trained, data)
    v = 3.0 * _direction(trained)  # norm about 17, five times the state's (about 3.5) where it is added
    model = _with_inserted(trained, 0, [Shift(v), Shift(-v)])  # layers 1 (+v) and 2 (-v)
    base = metric_with_removed(model, [], "loss", batches)
    alone = [metric_with_removed(model, [i], "loss", batches) - base for i in (1, 2)]
    assert min(alone) > 1.0  # either shift alone corrupts the state (trained loss is about 0.36)
    d = dependency_matrix(model, batches)
    # Removing both restores the trained model: Δ(1, 2) ≈ 0, so D = -Δ(1) - Δ(2) < 0.
    assert d[1, 2].item() == pytest.approx(-sum(alone), abs=1e-4)
    assert d[1, 2].item() < -2.0


def test_redundant_copies_interact_positively():
    trained, data = shared_trained("llama")
    batches = calibration_batches(trained, data)
    u = _direction(trained, seed=1)
    corrupt = Shift(3.0 * u / u.norm() * trained.hidden_size ** 0.5)
    model = _with_inserted(trained, 0, [corrupt, ProjectOut(u), ProjectOut(u)])  # layers 1, 2, 3
    d = dependency_matrix(model, batches)
    # Either projection alone undoes the corruption (Δ ≈ 0); without both it stays: D = Δ(2, 3) > 0.
    both = metric_with_removed(model, [2, 3], "loss", batches) - metric_with_removed(model, [], "loss", batches)
    assert both > 1.0
    assert d[2, 3].item() == pytest.approx(both, abs=1e-4)


def test_ndcg_metric_on_validation_data():
    model, data = shared_trained("llama")  # layer 1 is the identity
    batches = calibration_batches(model, data)
    d = dependency_matrix(model, batches, data, metric="ndcg@10")
    assert d.shape == (3, 3) and torch.equal(d, d.T)
    assert d[1].abs().max().item() < 1e-12
    # Δ(0, 2) is the NDCG drop of removing both real layers: check D against it directly.
    full = metric_with_removed(model, [], "ndcg@10", data=data)
    drop = lambda gone: full - metric_with_removed(model, gone, "ndcg@10", data=data)  # noqa: E731
    assert d[0, 2].item() == pytest.approx(drop([0, 2]) - drop([0]) - drop([2]), abs=1e-12)
    with pytest.raises(ValueError, match="needs validation data"):
        dependency_matrix(model, batches, metric="ndcg@10")
    with pytest.raises(ValueError, match="unknown metric"):
        dependency_matrix(model, batches, metric="hr@10")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_prefix_reuse_gives_the_gated_losses_and_matrix(family):
    """The validation-loss dependency with each unchanged prefix computed once equals gating layers off
    (the same chunks, the same float sums): every removal set's loss, and the matrix, exactly."""
    from layerwise.compression.dependency import prefix_reusable, removal_losses
    from tests.helpers.tiny_models import cyclic_data

    model, data = tiny_model(family, n_layers=5, n_items=20), cyclic_data(n_users=60)
    assert prefix_reusable(model)
    users = sample_users(data, 30, seed=0)  # the users dependency_matrix and ablation draw for max_users=30
    losses = removal_losses(model, data, users)
    assert len(losses) == 1 + 5 + 10
    for removed, loss in losses.items():
        assert loss == metric_with_removed(model, sorted(removed), "loss", data=data, users=users), removed
    fast = dependency_matrix(model, None, data, max_users=30)
    assert torch.equal(fast, dependency_matrix(model, None, data, max_users=30, reuse_prefix=False))
    assert fast.abs().max() > 0
    # Single removals only (the `ablation_loss` estimator): the same values.
    singles = removal_losses(model, data, users, pairs=False)
    assert singles == {k: v for k, v in losses.items() if len(k) <= 1}
    from layerwise.compression.importance import ablation

    gated = torch.tensor([metric_with_removed(model, [i], "loss", data=data, users=users) - losses[frozenset()]
                          for i in range(5)], dtype=torch.float64)
    assert torch.equal(ablation(model, None, data, metric="loss", max_users=30), gated)
    # Chunks of 8 users: the same losses up to float summation order.
    for removed, loss in removal_losses(model, data, users, chunk=8).items():
        assert loss == pytest.approx(losses[removed], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefix_reuse_gives_the_gated_ndcg_of_every_single_removal(family):
    """The `ablation` estimator's validation NDCG@10 with each unchanged prefix computed once equals gating
    the layer off and evaluating: the same ranks, so exactly the same means. 300 users make two of
    evaluate's batches of 256, taken as evaluate takes them (by history length)."""
    from layerwise.compression.dependency import removal_ndcg
    from layerwise.compression.importance import ablation
    from tests.helpers.tiny_models import cyclic_data

    model, data = tiny_model(family, n_layers=4, n_items=20), cyclic_data(n_users=300)
    for users in (None, sample_users(data, 30, seed=0)):
        values = removal_ndcg(model, data, users)
        assert set(values) == {frozenset()} | {frozenset({i}) for i in range(4)}
        for removed, ndcg in values.items():
            assert ndcg == metric_with_removed(model, sorted(removed), "ndcg@10", data=data, users=users), removed
    full = values[frozenset()]
    gated = torch.tensor([full - metric_with_removed(model, [i], "ndcg@10", data=data, users=users)
                          for i in range(4)], dtype=torch.float64)
    assert torch.equal(ablation(model, None, data, metric="ndcg@10", max_users=30), gated)
    assert gated.abs().max() > 0  # removals change the ranks: the comparison is not between constants
    with pytest.raises(ValueError, match="unknown metric"):
        ablation(model, None, data, metric="hr@10", max_users=30)


def test_removal_losses_resume_from_their_state_file_to_the_same_values(tmp_path):
    """Interrupted after its first chunk of users (a real interruption, raised inside the next chunk's
    forward), the computation goes on from its state file to exactly the values of one uninterrupted call;
    a state file of other users is refused."""
    from layerwise.compression.dependency import removal_losses
    from tests.helpers.tiny_models import cyclic_data

    model, data = tiny_model("llama", n_layers=4, n_items=20), cyclic_data(n_users=60)
    users = sample_users(data, 30, seed=0)
    whole = removal_losses(model, data, users, chunk=8)
    state = tmp_path / "resume" / "removal_losses.json"
    forwards = []

    def interrupt(module, args):  # layer 0 runs once per chunk: in its full forward
        forwards.append(1)
        if len(forwards) == 2:
            raise KeyboardInterrupt

    handle = model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        removal_losses(model, data, users, chunk=8, state=state)
    handle.remove()
    saved = json.loads(state.read_text())
    assert saved["rows_done"] == 8 and len(saved["totals"]) == 1 + 4 + 6
    assert removal_losses(model, data, users, chunk=8, state=state) == whole
    assert json.loads(state.read_text())["rows_done"] == 30
    with pytest.raises(ValueError, match=r"another computation \(differs in \['users'\]\)"):
        removal_losses(model, data, sample_users(data, 30, seed=1), chunk=8, state=state)
