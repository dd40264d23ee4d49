"""The greedy head search (HeadHunter), with racing and an exact checkpoint.

A round scores every remaining candidate head c by the objective's mean over the (prompt, seed) pairs of
images generated with guidance on S + {c}, and adds the top k to S. The paper scores every candidate on
every pair. Racing (successive halving) scores all candidates on the first few pairs, keeps the better
fraction, doubles the pairs, and so on: most candidates never see the whole pair set, and the survivors
are ranked on all of it.

Scores are keyed by (round, candidate, pair) and saved after every scored batch; a resumed search skips
what is saved and forms the same batches as an uninterrupted one (batches start at the same boundaries),
so it ends with the same scores bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..perturbation.headset import Head, RoundResult, SelectedHead, head_name

__all__ = ["Racing", "ScoreStore", "Processes", "greedy_search", "Item", "BASE"]

#: The candidate name under which a round's starting set S is scored (for the report's baseline).
BASE = "base"

#: An item to score: (the full head set, pair index).
Item = tuple[tuple[Head, ...], int]


@dataclass(frozen=True)
class Racing:
    """Successive halving over the (prompt, seed) pairs.

    Args:
        first_pairs: pairs every candidate is scored on.
        keep: fraction of candidates kept each time the pairs double.
        survivors: never keep fewer than this many; None = 2 x top_k, so that the final ranking on all
            pairs still has a choice.
    """

    first_pairs: int = 2
    keep: float = 0.5
    survivors: int | None = None

    def __post_init__(self) -> None:
        if self.first_pairs < 1:
            raise ValueError(f"Racing first_pairs={self.first_pairs} must be at least 1")
        if not 0.0 < self.keep < 1.0:
            raise ValueError(f"Racing keep={self.keep} must be in (0, 1), e.g. 0.5")
        if self.survivors is not None and self.survivors < 1:
            raise ValueError(f"Racing survivors={self.survivors} must be at least 1 (or None)")


class Processes:
    """Splits a step's batches over the processes of an ``accelerate launch`` and gathers their scores.

    Every process runs the same search; batch i of a step goes to process ``i % count``, and the gathered
    scores reach all of them, so their stores (and rankings) stay identical. One process: no split.

    Args:
        rank, count: this process and how many there are (None: from accelerate's ``PartialState``).
    """

    def __init__(self, rank: int | None = None, count: int | None = None) -> None:
        if rank is None or count is None:
            from accelerate import PartialState

            state = PartialState()
            rank, count = state.process_index, state.num_processes
        self.rank, self.count = rank, count

    def run(self, batches: list[Any], work: Callable[[Any], list[Any]]) -> list[list[Any]]:
        """``work(batch)`` for every batch, this process's share computed here, the rest gathered."""
        mine = [(i, work(batch)) for i, batch in enumerate(batches) if i % self.count == self.rank]
        if self.count > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        return [result for _, result in sorted(mine, key=lambda pair: pair[0])]


class ScoreStore:
    """Scores by (round, candidate, pair), optionally mirrored to a JSON checkpoint.

    Args:
        path: the checkpoint (None: in memory only). An existing file is resumed when its settings match.
        settings: everything the scores depend on; a checkpoint written under other settings is refused.
        write: whether this process writes the checkpoint (one process of several does; all read it).
    """

    def __init__(self, path: str | os.PathLike | None, settings: dict[str, Any], write: bool = True) -> None:
        self.path = None if path is None else Path(path)
        self.write = write
        self.settings = json.loads(json.dumps(settings))  # as it will read back
        self.scores: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("settings") != self.settings:
                changed = sorted(
                    k
                    for k in {*self.settings, *data.get("settings", {})}
                    if data.get("settings", {}).get(k) != self.settings.get(k)
                )
                raise ValueError(
                    f"checkpoint {str(self.path)!r} was written by a search with other settings ({changed}); "
                    "run with the same settings to resume it, or give another checkpoint path"
                )
            self.scores = dict(data["scores"])

    @staticmethod
    def key(round_index: int, candidate: str, pair: int) -> str:
        return f"{round_index}|{candidate}|{pair}"

    def get(self, round_index: int, candidate: str, pair: int) -> float | None:
        return self.scores.get(self.key(round_index, candidate, pair))

    def put(self, entries: Sequence[tuple[str, float]]) -> None:
        """Record scored items and write the checkpoint (atomically)."""
        self.scores.update(entries)
        if self.path is not None and self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"settings": self.settings, "scores": self.scores}))
            os.replace(tmp, self.path)


@dataclass
class _Round:
    """What one round needs to name and score its items."""

    index: int
    selected: tuple[Head, ...]

    def item(self, candidate: Head | None, pair: int) -> Item:
        return (self.selected if candidate is None else (*self.selected, candidate)), pair

    def name(self, candidate: Head | None) -> str:
        return BASE if candidate is None else head_name(candidate)


def greedy_search(
    candidates: Sequence[Head],
    num_pairs: int,
    score: Callable[[list[Item]], list[float]],
    store: ScoreStore,
    rounds: int,
    top_k: int,
    batch_size: int,
    racing: Racing | None = None,
    processes: Processes | None = None,
    progress: bool = True,
) -> list[RoundResult]:
    """Run the greedy rounds; returns what each round added.

    Args:
        candidates: the (layer, head) pairs to choose from, in model order (ties keep this order).
        num_pairs: how many (prompt, seed) pairs there are; items refer to them by index.
        score: scores a batch of items (one pipeline call).
        store: known scores; new ones are added after every batch.
        rounds, top_k: R rounds, each adding the k best heads.
        batch_size: items per ``score`` call.
        racing: successive halving; None scores every candidate on every pair (the paper's loop).
        processes: how batches are split over processes (None: all here).
        progress: show a progress bar.
    """
    remaining = list(candidates)
    selected: list[Head] = []
    results: list[RoundResult] = []
    bar = tqdm(desc="hunt", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for index in range(1, rounds + 1):
            if not remaining:
                break
            state = _Round(index, tuple(selected))
            ranked = _race(
                state, remaining, num_pairs, score, store, top_k, batch_size, racing, processes or Processes(0, 1), bar
            )
            base = _mean(store, state, None, num_pairs)
            added = ranked[:top_k]
            results.append(
                RoundResult(
                    index,
                    base,
                    tuple(SelectedHead(head_name(h), _mean(store, state, h, num_pairs), num_pairs) for h in added),
                )
            )
            selected += added
            remaining = [c for c in remaining if c not in added]
    finally:
        bar.close()
    return results


def _race(
    state: _Round,
    alive: list[Head],
    num_pairs: int,
    score: Callable[[list[Item]], list[float]],
    store: ScoreStore,
    top_k: int,
    batch_size: int,
    racing: Racing | None,
    processes: Processes,
    bar: tqdm,
) -> list[Head]:
    """One round's candidates ranked best first by their mean over all pairs (survivors only)."""
    floor = max(top_k, (racing.survivors or 2 * top_k) if racing else 0)
    done = 0
    target = min(num_pairs, racing.first_pairs) if racing else num_pairs
    while True:
        needed = [(c, p) for p in range(done, target) for c in [None, *alive]]
        _score_missing(state, needed, score, store, batch_size, processes, bar)
        done = target
        if done >= num_pairs:
            break
        if len(alive) > floor:
            ranked = sorted(alive, key=lambda c: -_mean(store, state, c, done))
            alive = [c for c in alive if c in ranked[: max(floor, math.ceil(racing.keep * len(alive)))]]
        target = min(num_pairs, 2 * done)
    return sorted(alive, key=lambda c: -_mean(store, state, c, num_pairs))  # stable: ties keep model order


def _score_missing(
    state: _Round,
    needed: list[tuple[Head | None, int]],
    score: Callable[[list[Item]], list[float]],
    store: ScoreStore,
    batch_size: int,
    processes: Processes,
    bar: tqdm,
) -> None:
    """Score the items not in the store, ``batch_size`` per call, saving after every step."""
    missing = [(c, p) for c, p in needed if store.get(state.index, state.name(c), p) is None]
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    bar.total = (bar.total or 0) + len(missing)
    bar.refresh()

    def run(batch: list[tuple[Head | None, int]]) -> list[tuple[str, float]]:
        values = score([state.item(c, p) for c, p in batch])
        return [(ScoreStore.key(state.index, state.name(c), p), v) for (c, p), v in zip(batch, values, strict=True)]

    for begin in range(0, len(batches), processes.count):
        for batch_entries in processes.run(batches[begin : begin + processes.count], run):
            store.put(batch_entries)
            bar.update(len(batch_entries))


def _mean(store: ScoreStore, state: _Round, candidate: Head | None, pairs: int) -> float:
    values = [store.get(state.index, state.name(candidate), p) for p in range(pairs)]
    return float(sum(values) / len(values))
