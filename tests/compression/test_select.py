import pytest
import torch

from layerwise.compression.select import SELECTORS, beam, contiguous, first, greedy, last, random, topk, uniform

SCORES = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.7, 1.0])  # 6 layers


def test_registry_names():
    assert sorted(SELECTORS) == sorted(["topk", "greedy", "beam", "contiguous", "uniform", "random", "first", "last"])


def _context():
    n = len(SCORES)
    return {"rescore": lambda kept: SCORES[kept], "dependency": torch.zeros(n, n), "seed": 3,
            "block_scores": torch.arange(n, dtype=torch.float64)}


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_every_selector_returns_k_sorted_unique_indices(name, k):
    ctx = _context()
    if name == "contiguous":
        ctx["block_scores"] = torch.arange(6 - (6 - k) + 1, dtype=torch.float64)
    kept = SELECTORS[name](SCORES, k, **ctx)
    assert len(kept) == k and kept == sorted(set(kept)) and all(0 <= i < 6 for i in kept)
    assert all(isinstance(i, int) for i in kept)
    if k == 6:
        assert kept == list(range(6))


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("k", [0, 7, -1, 2.0, True])
def test_k_out_of_range_is_a_clear_error(name, k):
    with pytest.raises(ValueError, match="k must be an integer from 1 to 6"):
        SELECTORS[name](SCORES, k, **_context())


def test_topk_keeps_highest_and_breaks_ties_low():
    assert topk(SCORES, 3) == [1, 3, 5]
    assert topk(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2) == [1, 2]
    with pytest.raises(ValueError, match="finite"):
        topk(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="one value per layer"):
        topk(torch.ones(2, 2), 1)


def test_greedy_rescores_after_each_removal():
    calls = []

    def rescore(kept):
        calls.append(list(kept))
        # Once layer 2 is gone, layer 3 looks useless (it only mattered together with layer 2).
        return torch.tensor([0.0 if (l == 3 and 2 not in kept) else float(SCORES[l]) for l in kept])

    assert greedy(SCORES, 4, rescore=rescore) == [0, 1, 4, 5]
    assert greedy(torch.tensor([1.0, 1.0, 2.0]), 2, rescore=rescore) == [0, 2]  # tie: keep the lower
    assert calls == [[0, 1, 3, 4, 5]]  # the first removal uses the given scores; no call after the last
    assert topk(SCORES, 4) == [1, 3, 4, 5]  # scoring once keeps layer 3
    with pytest.raises(ValueError, match="rescore"):
        greedy(SCORES, 4)
    with pytest.raises(ValueError, match="rescore must return 5"):
        greedy(SCORES, 4, rescore=lambda kept: torch.ones(2))


def test_beam_prefers_a_pair_with_negative_interaction():
    scores = torch.tensor([0.5, 1.0, 1.0, 3.0])
    dep = torch.zeros(4, 4)
    dep[1, 2] = dep[2, 1] = -1.8  # removing 1 and 2 together costs 1 + 1 - 1.8 = 0.2
    assert beam(scores, 2, dependency=dep) == [0, 3]
    assert beam(scores, 2, dependency=dep, width=1) == [1, 3]  # a width-1 beam is greedy: 0 goes first
    assert topk(scores, 2) == [1, 3]  # tie between layers 1 and 2: the lower one is kept
    assert beam(scores, 2, dependency=torch.zeros(4, 4)) == topk(scores, 2)  # no interactions: top-k


def test_beam_avoids_a_pair_with_positive_interaction():
    scores = torch.tensor([0.1, 0.2, 1.0, 3.0])
    dep = torch.zeros(4, 4)
    dep[0, 1] = dep[1, 0] = 2.0  # redundant pair: removing both hurts far more than each alone
    assert beam(scores, 2, dependency=dep) == [1, 3]  # removes {0, 2}: 1.1 < 0.3 + 2.0
    with pytest.raises(ValueError, match="dependency"):
        beam(scores, 2)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        beam(scores, 2, dependency=torch.zeros(3, 3))


def test_contiguous_removes_the_closest_block():
    blocks = torch.tensor([0.9, 0.4, 0.2, 0.6])  # removing 3 of 6 layers: blocks start at 0..3
    assert contiguous(SCORES, 3, block_scores=blocks) == [0, 1, 5]
    assert contiguous(SCORES, 3, block_scores=torch.tensor([0.2, 0.4, 0.2, 0.6])) == [0, 1, 5]  # tie
    with pytest.raises(ValueError, match="must have 4 entries"):
        contiguous(SCORES, 3, block_scores=torch.zeros(3))
    with pytest.raises(ValueError, match="angular_blocks"):
        contiguous(SCORES, 3)


def test_uniform_first_last_random():
    assert uniform(torch.zeros(8), 4) == [1, 3, 5, 7]
    assert uniform(torch.zeros(8), 3) == [2, 5, 7]
    assert uniform(torch.zeros(8), 1) == [7]  # the last layer is always kept
    assert first(SCORES, 2) == [0, 1] and last(SCORES, 2) == [4, 5]
    draws = [random(SCORES, 3, seed=s) for s in range(5)]
    assert draws[0] == random(SCORES, 3, seed=0)  # seeded
    assert len({tuple(d) for d in draws}) > 1  # but not constant across seeds
