"""From raw interactions to per-user chronological sequences with a leave-one-out split.

`build_sequences` sorts each user's interactions by time (file order breaks ties), optionally applies a
k-core filter, drops users too short to split, maps raw ids to indices (items 1..n, 0 is padding), and
returns a `SequenceData`: every user's full history concatenated, with offsets. The split is implicit and
fixed: a user's last item is the test target, the second-to-last the validation target, the rest train.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from layerwise.data.readers import DataError, Interactions

PAD = "[PAD]"
STAGES = ("valid", "test")


@dataclass(frozen=True, eq=False)
class SequenceData:
    """Chronological histories of every user, leave-one-out split (see docs/CONTRACTS.md).

    Attributes:
        name: data set name.
        user_ids: raw id per user index (0..n_users-1).
        item_ids: raw id per item index; entry 0 is "[PAD]".
        offsets: (n_users + 1,) int64; user u's history is items[offsets[u]:offsets[u+1]].
        items: (n_interactions,) int32 item indices in 1..n_items, each user's history oldest first.
        item_text: title + genres per item index ("" for padding and items without metadata), or None.
        item_genres: genres per item index, or None.
        user_features: feature -> value per user index, or None.
        fingerprint: sha256 of offsets, items and ids (the split is a function of these).
        protocol: how the data was built (filters, counts dropped, split rule).
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    offsets: np.ndarray
    items: np.ndarray
    item_text: list[str] | None = None
    item_genres: list[list[str]] | None = None
    user_features: dict[str, list[str]] | None = None
    fingerprint: str = ""
    protocol: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(n_users,) int64 full history length per user."""
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        """User u's full history, oldest first: (len,) int32."""
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    def train_sequence(self, u: int) -> np.ndarray:
        """All but the last two items (the validation and test targets)."""
        return self.sequence(u)[:-2]

    def history(self, u: int, stage: str) -> np.ndarray:
        """What the model sees when predicting `target(u, stage)`: all items before it."""
        return self.sequence(u)[: -_holdout(stage)]

    def target(self, u: int, stage: str) -> int:
        """The held-out item: second-to-last for "valid", last for "test"."""
        return int(self.items[self.offsets[u + 1] - _holdout(stage)])

    def targets(self, stage: str) -> np.ndarray:
        """(n_users,) int64 held-out item per user."""
        return self.items[self.offsets[1:] - _holdout(stage)].astype(np.int64)

    def padded_histories(self, users: np.ndarray | list[int] | torch.Tensor, stage: str,
                         max_len: int) -> torch.Tensor:
        """Left-padded histories for a batch of users.

        Args:
            users: (B,) user indices.
            stage: "valid" or "test".
            max_len: columns T; longer histories keep their most recent T items.

        Returns:
            (B, T) LongTensor, 0 = padding, most recent item in the last column.
        """
        users = np.asarray(users, dtype=np.int64)
        end = self.offsets[users + 1] - _holdout(stage)
        start = self.offsets[users]
        idx = end[:, None] - max_len + np.arange(max_len)[None, :]
        valid = idx >= start[:, None]
        out = np.where(valid, self.items[np.where(valid, idx, 0)], 0)
        return torch.from_numpy(out.astype(np.int64))

    @cached_property
    def _item_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids) if i > 0}

    def encode_items(self, raw_ids) -> np.ndarray:
        """Map a caller's history of raw item ids to item indices, refusing anything unknown or invalid.

        Args:
            raw_ids: (L,) raw ids as strings or non-negative integers (an int is looked up as str(int)).

        Returns:
            (L,) int64 indices in 1..n_items.

        Raises:
            DataError: naming each unknown or invalid id and its position.
        """
        out, problems = np.zeros(len(raw_ids), dtype=np.int64), []
        for pos, raw in enumerate(raw_ids):
            is_int = isinstance(raw, (int, np.integer)) and not isinstance(raw, bool)
            if not (is_int or isinstance(raw, str)) or (is_int and raw < 0):
                problems.append(f"position {pos}: invalid item id {raw!r} (need a raw id string or an int >= 0)")
            elif (idx := self._item_index.get(str(raw))) is None:
                problems.append(f"position {pos}: unknown item id {raw!r}")
            else:
                out[pos] = idx
        if problems:
            raise DataError(f"{self.name}: bad item history: " + "; ".join(problems[:10])
                            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return out

    def check_indices(self, indices) -> np.ndarray:
        """Check a history already given as item indices: (L,) ints in 1..n_items -> (L,) int64."""
        arr = np.asarray(indices)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{self.name}: a history must be a 1-d list of integer item indices, got {arr!r}")
        bad = np.flatnonzero((arr < 1) | (arr > self.n_items))
        if len(bad):
            shown = ", ".join(f"position {p}: {int(arr[p])}" for p in bad[:10])
            raise DataError(f"{self.name}: item indices must be in 1..{self.n_items}; bad: {shown}")
        return arr.astype(np.int64)


def _holdout(stage: str) -> int:
    """How many items at the end of the full history are not visible: 2 for valid, 1 for test."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return 2 if stage == "valid" else 1


def build_sequences(interactions: Interactions, name: str, min_core: int = 0, min_seq: int = 3) -> SequenceData:
    """Sort, filter, index and split an interaction log.

    Args:
        interactions: the raw log (n rows).
        name: data set name, carried into `SequenceData.name` and error messages.
        min_core: k-core filter; users and items are dropped, repeatedly, until every user has at least
            max(k, min_seq) interactions and every item at least k (0 disables).
        min_seq: users with fewer interactions cannot be split (train, valid, test) and are dropped.

    Returns:
        The sequences; `protocol` records the rules and how many users/items/rows each filter dropped.
    """
    if min_seq < 3:
        raise ValueError(f"min_seq must be >= 3 (one train, one valid and one test item), got {min_seq}")
    if len(interactions) == 0:
        raise DataError(f"{name}: no interactions")
    user, user_raw = _encode(interactions.user)
    item, item_raw = _encode(interactions.item)
    order = np.lexsort((interactions.timestamp, user))  # lexsort is stable: equal times keep file order
    user, item = user[order], item[order]
    raw_counts = np.bincount(user, minlength=len(user_raw))
    keep, rounds = _filter_counts(user, item, len(user_raw), len(item_raw), max(min_core, min_seq), min_core)
    if not keep.any():
        raise DataError(f"{name}: no user is left with >= {max(min_core, min_seq)} interactions "
                        f"(min_core={min_core}, min_seq={min_seq})")
    user, item = user[keep], item[keep]
    users_kept, items_kept = np.unique(user), np.unique(item)  # codes are already in id order
    user_idx = np.searchsorted(users_kept, user)
    items = (np.searchsorted(items_kept, item) + 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_idx, minlength=len(users_kept)))]).astype(np.int64)
    user_ids = [user_raw[c] for c in users_kept.tolist()]
    item_ids = [PAD] + [item_raw[c] for c in items_kept.tolist()]
    text, genres = _item_text(interactions.item_meta, item_ids)
    protocol = _protocol(min_core, min_seq, rounds, raw_counts, len(item_raw), len(users_kept), len(items_kept),
                         len(items))
    return SequenceData(
        name=name, user_ids=user_ids, item_ids=item_ids, offsets=offsets, items=items, item_text=text,
        item_genres=genres, user_features=_user_features(interactions.user_features, user_ids),
        fingerprint=fingerprint(offsets, items, user_ids, item_ids), protocol=protocol,
    )


def _protocol(min_core: int, min_seq: int, rounds: int, raw_counts: np.ndarray, n_items_raw: int,
              n_users: int, n_items: int, n_interactions: int) -> dict:
    """The JSON-able record of how the split was made and what each filter dropped."""
    n_users_raw, n_raw = int((raw_counts > 0).sum()), int(raw_counts.sum())
    return {
        "split": "leave-one-out: last item = test, second-to-last = valid, the rest = train",
        "order": "timestamp ascending; file order breaks ties",
        "ids": "users 0..n-1 and items 1..n in natural order of raw ids (numeric when all are digits)",
        "min_core": int(min_core), "min_seq": int(min_seq), "core_rounds": rounds,
        "raw": {"users": n_users_raw, "items": n_items_raw, "interactions": n_raw},
        "dropped": {"users_short": int(((raw_counts > 0) & (raw_counts < min_seq)).sum()),
                    "users": n_users_raw - n_users, "items": n_items_raw - n_items,
                    "interactions": n_raw - n_interactions},
    }


def fingerprint(offsets: np.ndarray, items: np.ndarray, user_ids: list[str], item_ids: list[str]) -> str:
    """sha256 (hex) of the split: offsets (little-endian int64), items (int32) and both id lists.

    Fixed byte layouts and length prefixes make it identical across runs, machines and numpy versions.
    """
    h = hashlib.sha256(b"layerwise.SequenceData/v1")
    sizes = [len(offsets), len(items), len(user_ids), len(item_ids)]
    h.update(np.asarray(sizes, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(items, dtype="<i4").tobytes())
    for ids in (user_ids, item_ids):
        h.update("\0".join(ids).encode("utf-8"))
        h.update(b"\1")
    return h.hexdigest()


def _encode(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Raw ids -> ((n,) int64 codes, sorted unique raw ids), code c meaning sorted_ids[c].

    pyarrow's hash-based dictionary encoding is far faster than sorting a million Python strings; only the
    (much smaller) set of unique ids is then sorted.
    """
    encoded = pa.array(values, type=pa.string()).dictionary_encode()
    uniques = encoded.dictionary.to_pylist()
    if all(u.isascii() and u.isdigit() for u in uniques):
        order = sorted(range(len(uniques)), key=lambda i: (int(uniques[i]), uniques[i]))
    else:
        order = sorted(range(len(uniques)), key=uniques.__getitem__)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[order] = np.arange(len(uniques))
    codes = rank[pc.fill_null(encoded.indices, 0).to_numpy()]
    return codes, [uniques[i] for i in order]


def _filter_counts(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, user_min: int,
                   item_min: int) -> tuple[np.ndarray, int]:
    """Rows to keep so that every kept user has >= user_min and every kept item >= item_min rows.

    Dropping a user can push an item under its threshold and vice versa, so repeat to a fixed point.
    Returns the (n,) bool mask and how many rounds it took.
    """
    keep = np.ones(len(user), dtype=bool)
    for rounds in range(1, len(user) + 2):
        user_count = np.bincount(user[keep], minlength=n_users)
        item_count = np.bincount(item[keep], minlength=n_items)
        bad = keep & ((user_count[user] < user_min) | (item_count[item] < item_min))
        if not bad.any():
            return keep, rounds - 1
        keep &= ~bad
    return keep, rounds


def _item_text(meta: dict[str, tuple[str, list[str]]] | None,
               item_ids: list[str]) -> tuple[list[str] | None, list[list[str]] | None]:
    """"Title (Genre, Genre)" and the genre list per item index; "" and [] where nothing is known."""
    if meta is None:
        return None, None
    pairs = [("", [])] + [meta.get(raw, ("", [])) for raw in item_ids[1:]]
    text = [f"{t} ({', '.join(g)})" if g else t for t, g in pairs]
    return text, [list(g) for _, g in pairs]


def _user_features(features: dict[str, dict[str, str]] | None, user_ids: list[str]) -> dict[str, list[str]] | None:
    if features is None:
        return None
    return {f: [values.get(u, "") for u in user_ids] for f, values in features.items()}
