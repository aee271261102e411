"""A synthetic interaction log with structure a sequence model can learn, generated vectorised.

The generative story, per user, one step at a time:
  * popularity: items have Zipf-Mandelbrot weights, (rank + 9)^-0.8, over a random order;
  * taste: each user mixes over topics (a sparse Dirichlet); items belong to one topic each; a taste step
    draws a topic from the user's mix, then an item from that topic by popularity;
  * sequence: with probability `p_next` the next item is one of the previous item's few fixed successors
    (mostly in its own topic, some in the next topic), so "previous item -> next item" carries signal that
    popularity alone does not;
  * exploration: with probability 0.05 an item is drawn from global popularity;
  * activity: history lengths are log-normal, at least 5 each, summing exactly to `n_interactions`.
No user sees an item twice: the walk is over-generated, later repeats are dropped, and the few users left
short get their walk continued. All of it runs as numpy operations over all users at once per step, so the
seed-scale log (100k users, 10k items, 1M interactions) takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layerwise.data.readers import Interactions

GENERATOR_VERSION = 1  # bump when the output for a given seed changes: cached splits key on it
MIN_LEN = 5
N_SUCCESSORS = 10
EXPLORE = 0.05
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western", "Biography", "Sport")
_ADJECTIVES = ("Silent", "Broken", "Golden", "Last", "Hidden", "Crimson", "Lost", "Wild", "Distant", "Bright",
               "Frozen", "Secret", "Electric", "Quiet", "Burning", "Little")
_NOUNS = ("River", "Empire", "Garden", "Machine", "Harbor", "Promise", "Shadow", "Frontier", "Letter",
          "Station", "Kingdom", "Summer", "Signal", "Island", "Mirror", "Road")


@dataclass(frozen=True)
class _World:
    """Items in topic-sorted order: topic per item, popularity samplers, successor table."""

    topic: np.ndarray  # (n_items,) int, non-decreasing
    in_topic_cdf: np.ndarray  # (n_items,) topic + within-topic cumulative popularity, in (topic, topic+1]
    global_cdf: np.ndarray  # (n_items,) cumulative popularity over all items
    successors: np.ndarray  # (n_items, N_SUCCESSORS) int32
    successor_cdf: np.ndarray  # (N_SUCCESSORS,) which successor is taken, most likely the first

    def in_topic(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item drawn by popularity inside each given topic: (n,) topics, (n,) uniforms -> (n,) items."""
        return _draw_in_topic(self.in_topic_cdf, topic, u)

    def popular(self, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.global_cdf, u * self.global_cdf[-1], side="right")
        return np.minimum(idx, len(self.topic) - 1).astype(np.int32)


def generate_synthetic(
    n_users: int,
    n_items: int,
    n_interactions: int,
    seed: int = 0,
    n_topics: int = 20,
    p_next: float = 0.5,
) -> Interactions:
    """Generate a learnable interaction log (see the module docstring for the generative story).

    Args:
        n_users: users, each with at least 5 interactions.
        n_items: catalogue size (every item gets a title and its topic as genre; a few may go unseen).
        n_interactions: total rows, exactly; needs 5 * n_users <= n_interactions <= n_users * (n_items // 2).
        seed: everything derives from `numpy.random.default_rng(seed)`.
        n_topics: latent topics (= genres).
        p_next: probability that a step follows the previous item's successors.

    Returns:
        Interactions with raw ids "1".."n", integer-second timestamps in time order, and item metadata.
    """
    cap = max(MIN_LEN, n_items // 2)  # half the catalogue: room left for the walk to stay structured
    if not (n_users > 0 and MIN_LEN * n_users <= n_interactions <= cap * n_users and n_topics <= n_items):
        raise ValueError(f"need n_users > 0, {MIN_LEN} * n_users <= n_interactions <= n_users * (n_items // 2) "
                         f"and n_topics <= n_items; got {n_users}, {n_items}, {n_interactions}, {n_topics}")
    rng = np.random.default_rng(seed)
    world = _make_world(rng, n_items, n_topics)
    lengths = _user_lengths(rng, n_users, n_interactions, cap)
    taste_cdf = np.cumsum(rng.dirichlet(np.full(n_topics, 0.3), size=n_users), axis=1)
    user, item = _unique_walks(rng, world, taste_cdf, lengths, p_next)
    timestamp = _timestamps(rng, lengths)
    order = np.argsort(timestamp, kind="stable")  # a log is written in time order, not user by user
    item_names = (rng.permutation(n_items) + 1).astype(str)  # hides the topic-sorted internal order
    user_names = (np.arange(n_users) + 1).astype(str)
    return Interactions(
        user=user_names[user[order]],
        item=item_names[item[order]],
        timestamp=timestamp[order],
        item_meta=_item_meta(rng, world.topic, item_names, n_topics),
    )


def _make_world(rng: np.random.Generator, n_items: int, n_topics: int) -> _World:
    topic = np.sort(np.arange(n_items) % n_topics)
    # Zipf-Mandelbrot: the offset flattens the very top, so the head resembles MovieLens (top 10% of
    # items ~ half the interactions) instead of one item taking a tenth of them.
    weight = (rng.permutation(n_items) + 10.0) ** -0.8
    start = np.searchsorted(topic, np.arange(n_topics))
    cum = np.cumsum(weight)
    before = np.concatenate([[0.0], cum])[start][topic]
    total = np.bincount(topic, weights=weight, minlength=n_topics)[topic]
    in_topic = (cum - before) / total
    in_topic[np.r_[start[1:] - 1, n_items - 1]] = 1.0  # exact upper end, so float error cannot spill over
    in_topic_cdf = topic + in_topic
    # Successors: mostly the item's own topic, 30% the "next" topic, so sequences also drift across topics.
    drift = rng.random((n_items, N_SUCCESSORS)) < 0.3
    succ_topic = np.where(drift, (topic[:, None] + 1) % n_topics, topic[:, None])
    successors = _draw_in_topic(in_topic_cdf, succ_topic.ravel(), rng.random(succ_topic.size))
    pick = np.cumsum(1.0 / np.arange(1, N_SUCCESSORS + 1))  # successor j taken with weight 1/(j+1)
    return _World(topic, in_topic_cdf, cum, successors.reshape(succ_topic.shape), pick / pick[-1])


def _draw_in_topic(in_topic_cdf: np.ndarray, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw inside each topic, all topics in one searchsorted: topic k's CDF spans (k, k+1]."""
    idx = np.searchsorted(in_topic_cdf, topic + u, side="right")
    return np.minimum(idx, len(in_topic_cdf) - 1).astype(np.int32)


def _user_lengths(rng: np.random.Generator, n_users: int, n_interactions: int, cap: int) -> np.ndarray:
    """(n_users,) log-normal lengths >= MIN_LEN and <= cap, summing exactly to n_interactions."""
    weight = rng.lognormal(0.0, 1.2, size=n_users)
    lengths = MIN_LEN + rng.multinomial(n_interactions - MIN_LEN * n_users, weight / weight.sum())
    while (excess := int(np.maximum(lengths - cap, 0).sum())) > 0:
        lengths = np.minimum(lengths, cap)
        room = (cap - lengths).astype(np.float64)
        lengths += rng.multinomial(excess, room / room.sum())
    return lengths.astype(np.int64)


def _walk(rng: np.random.Generator, world: _World, taste_cdf: np.ndarray, steps: np.ndarray,
          p_next: float, prev: np.ndarray | None) -> np.ndarray:
    """Walk `steps[u]` items for every user at once, one time step per loop iteration.

    Args:
        taste_cdf: (n, n_topics) cumulative topic mix per walking user.
        steps: (n,) steps per walking user.
        prev: (n,) item each walk continues from, or None to start fresh.

    Returns:
        (steps.sum(),) int32 items, user-major (user 0's walk, then user 1's, ...).
    """
    order = np.argsort(-steps, kind="stable")  # longest first: the users still walking are a prefix
    n_active = np.searchsorted(-steps[order], -np.arange(int(steps.max(initial=0))), side="left")
    offsets = np.concatenate([[0], np.cumsum(steps)[:-1]])
    out = np.empty(int(steps.sum()), dtype=np.int32)
    last = None if prev is None else prev.astype(np.int32)
    for t, n_t in enumerate(n_active):
        users = order[:n_t]
        topic = (taste_cdf[users] < rng.random(n_t)[:, None]).sum(axis=1)
        items = world.in_topic(topic, rng.random(n_t))
        if last is not None:
            follow = np.flatnonzero(rng.random(n_t) < p_next)
            pick = np.searchsorted(world.successor_cdf, rng.random(len(follow)), side="right")
            items[follow] = world.successors[last[users[follow]], np.minimum(pick, N_SUCCESSORS - 1)]
        wander = np.flatnonzero(rng.random(n_t) < EXPLORE)
        items[wander] = world.popular(rng.random(len(wander)))
        out[offsets[users] + t] = items
        last = np.zeros(len(steps), dtype=np.int32) if last is None else last
        last[users] = items
    return out


def _unique_walks(rng: np.random.Generator, world: _World, taste_cdf: np.ndarray, lengths: np.ndarray,
                  p_next: float) -> tuple[np.ndarray, np.ndarray]:
    """Walks with no repeated item per user, exactly `lengths[u]` long: ((N,) users, (N,) items) user-major."""
    n_users, n_items = len(lengths), len(world.topic)
    steps = lengths + lengths // 4 + 2  # slack for the repeats that get dropped
    owner = np.repeat(np.arange(n_users), steps)
    items = _walk(rng, world, taste_cdf, steps, p_next, None)
    for _ in range(8):
        owner, items = _drop_repeats(owner, items, n_items)
        have = np.bincount(owner, minlength=n_users)
        short = np.flatnonzero(have < lengths)
        if len(short) == 0:
            break
        # Continue the short users' walks from where they stopped (user-major, so their last row).
        more_steps = 2 * (lengths[short] - have[short]) + 4
        last = items[np.cumsum(have)[short] - 1]
        more = _walk(rng, world, taste_cdf[short], more_steps, p_next, last)
        owner = np.concatenate([owner, np.repeat(short, more_steps)])
        items = np.concatenate([items, more])
        order = np.argsort(owner, kind="stable")  # stable: continuations stay after the walk they extend
        owner, items = owner[order], items[order]
    else:  # the last round's continuations still hold repeats
        owner, items = _fill_unseen(rng, *_drop_repeats(owner, items, n_items), lengths, n_items)
    start = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_users))[:-1]])
    keep = np.arange(len(owner)) - start[owner] < lengths[owner]
    return owner[keep], items[keep]


def _drop_repeats(owner: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep only each (user, item) pair's first occurrence, preserving row order."""
    _, first = np.unique(owner.astype(np.int64) * n_items + items, return_index=True)
    keep = np.zeros(len(owner), dtype=bool)
    keep[first] = True
    return owner[keep], items[keep]


def _fill_unseen(rng: np.random.Generator, owner: np.ndarray, items: np.ndarray, lengths: np.ndarray,
                 n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Last resort for users whose walk keeps revisiting a tiny neighbourhood: append random unseen items."""
    have = np.bincount(owner, minlength=len(lengths))
    end = np.cumsum(have)
    extra_owner, extra_items = [], []
    for u in np.flatnonzero(have < lengths):
        seen = items[end[u] - have[u]:end[u]]
        fresh = np.setdiff1d(rng.permutation(n_items), seen, assume_unique=True)[: lengths[u] - have[u]]
        extra_owner.append(np.full(len(fresh), u))
        extra_items.append(fresh.astype(np.int32))
    owner = np.concatenate([owner, *extra_owner])
    items = np.concatenate([items, *extra_items])
    order = np.argsort(owner, kind="stable")
    return owner[order], items[order]


def _timestamps(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """(lengths.sum(),) float64 integer seconds, user-major, strictly increasing within each user."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps = 1.0 + np.floor(rng.exponential(43_200.0, size=int(lengths.sum())))  # about half a day apart
    elapsed = np.cumsum(gaps)
    since_start = elapsed - (elapsed[first] - gaps[first])[owner]
    start = 1_600_000_000.0 + np.floor(rng.uniform(0.0, 2 * 365 * 86_400.0, size=len(lengths)))
    return start[owner] + since_start


def _item_meta(rng: np.random.Generator, topic: np.ndarray, names: np.ndarray,
               n_topics: int) -> dict[str, tuple[str, list[str]]]:
    """Title and genres per raw item id; genre = the item's topic (sometimes also the next topic)."""
    genre = [GENRES[k] if k < len(GENRES) else f"Genre{k}" for k in range(n_topics)]
    adj = rng.integers(len(_ADJECTIVES), size=len(topic))
    noun = rng.integers(len(_NOUNS), size=len(topic))
    second = (rng.random(len(topic)) < 0.3) & (n_topics > 1)
    return {
        str(name): (f"The {_ADJECTIVES[a]} {_NOUNS[b]} {name}",
                    [genre[t], genre[(t + 1) % n_topics]] if two else [genre[t]])
        for name, t, a, b, two in zip(names.tolist(), topic.tolist(), adj.tolist(), noun.tolist(), second.tolist())
    }
