"""Batches of similar-length windows, and the left padding they share cut off.

Histories and training windows are left-padded to `max_len` (50). On the literature's sparse data sets most
of that is padding: on Beauty 11.7% of a training window's cells hold an item, so nearly nine tenths of
every layer's work was spent on columns that attention masks out anyway. Grouping windows of similar
length into a batch and cutting the columns that are padding in every row of it removes that work.

Cutting is exact: the columns removed are padding in every row, so attention never looked at them, and
`SequentialRecommender.encode(inputs, start=...)` gives the kept columns the position ids they had in the
full window (absolute-position families such as GPT-2 and BERT see the same positions; rotary families
the same angles; T5's relative buckets do not depend on where the window starts).

    batches = length_batches(window_lengths(inputs), batch_size=128, generator=g)
    for idx in batches:
        start, x, y = trim_left(inputs[idx], targets[idx])
        hidden = model.encode(x, start=start)           # (B, T - start, H)
"""

from __future__ import annotations

import torch


def window_lengths(inputs: torch.Tensor) -> torch.Tensor:
    """Columns from a row's first item to the end. inputs: (N, T) left-padded, 0 = padding -> (N,) long.

    A row's length counts any padding inside it too (none in our windows); a row of padding only has 0.
    """
    real = inputs != 0
    first = real.int().argmax(dim=1)  # the first True column; 0 for a row with none
    return torch.where(real.any(dim=1), inputs.shape[1] - first, 0)


def trim_left(inputs: torch.Tensor, *aligned: torch.Tensor) -> tuple[int, ...]:
    """Cut the leading columns that are padding in every row of `inputs`.

    Args:
        inputs: (B, T) left-padded indices, 0 = padding.
        aligned: tensors (B, T, ...) cut at the same columns (targets, masks).

    Returns:
        (start, inputs[:, start:], *[a[:, start:] for a in aligned]); `start` is the index in the full
        window of the first kept column, which `SequentialRecommender.encode` needs for position ids. At
        least one column is kept, even when every row is padding.
    """
    longest = int(window_lengths(inputs).max()) if len(inputs) else inputs.shape[1]
    start = min(inputs.shape[1] - longest, inputs.shape[1] - 1)
    return (start, inputs[:, start:], *(a[:, start:] for a in aligned))


def length_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator,
                   min_windows: int = 1) -> list[torch.Tensor]:
    """One epoch's batches: every window once, windows of similar length together, in a random order.

    Windows are sorted by length (ties in random order) and cut into batches of about
    `batch_size * mean(lengths)` item cells each, then the batches are shuffled. A batch therefore holds
    about as many predicted positions as a random batch of `batch_size` windows did, and an epoch has
    about as many steps: short windows come many to a batch, long ones about `batch_size`. (Equal-count
    batches of short windows would give their few positions each many times the weight in the mean loss.)

    Args:
        lengths: (N,) window lengths (see `window_lengths`).
        batch_size: windows per batch on average.
        generator: seeds the tie order and the batch order.
        min_windows: fewest windows in a batch (data-parallel ranks each need one); smaller cuts are
            merged into their neighbour, as is a last batch of less than half the cells.

    Returns:
        Batches of window indices (long tensors); together a permutation of range(N).
    """
    if batch_size < 1 or min_windows < 1:
        raise ValueError(f"batch_size and min_windows must be >= 1, got {batch_size} and {min_windows}")
    if len(lengths) < min_windows:
        raise ValueError(f"{len(lengths)} windows cannot fill a batch of at least {min_windows}")
    lengths = lengths.to(torch.long).clamp(min=1)
    ties = torch.randperm(len(lengths), generator=generator)
    order = ties[torch.argsort(lengths[ties], stable=True)]  # by length; equal lengths in random order
    budget = max(1.0, batch_size * float(lengths.float().mean()))
    cells = torch.cumsum(lengths[order], 0).double()
    sizes = torch.bincount(torch.div(cells - 1, budget, rounding_mode="floor").long())
    batches = list(torch.split(order, _merge_small(sizes[sizes > 0].tolist(), min_windows)))
    last_cells = float(lengths[batches[-1]].sum())
    if len(batches) > 1 and last_cells < budget / 2:
        batches[-2:] = [torch.cat(batches[-2:])]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _merge_small(sizes: list[int], minimum: int) -> list[int]:
    """Batch sizes with every batch of fewer than `minimum` windows merged into the next (a short last one
    into the one before): [1, 1, 5, 1] with minimum 2 -> [2, 6]."""
    out, pending = [], 0
    for size in sizes:
        pending += size
        if pending >= minimum:
            out.append(pending)
            pending = 0
    if pending:
        if out:
            out[-1] += pending
        else:
            out.append(pending)
    return out
