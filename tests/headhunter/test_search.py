"""The greedy loop on deterministic toy objectives: order, top-k, racing, checkpoint and resume."""

from __future__ import annotations

import itertools
import json

import pytest

from attnsurgery.headhunter.search import BASE, Processes, Racing, ScoreStore, greedy_search

HEADS = [(f"layer{layer}", head) for layer in range(4) for head in range(6)]
# distinct values, not in model order; layer0's heads are the six best on their own
VALUE = {h: 1.0 + 0.01 * h[1] if h[0] == "layer0" else ((7 * i) % 24) / 24 for i, h in enumerate(HEADS)}


def toy_score(items):
    """Additive head values, a penalty for a second head in the same layer, and a small per-pair offset."""
    out = []
    for heads, pair in items:
        layers = [path for path, _ in heads]
        crowding = sum(n - 1 for n in map(layers.count, set(layers)))
        out.append(sum(VALUE[h] for h in heads) - 0.6 * crowding + 0.01 * pair)
    return out


def brute_force_greedy(rounds, top_k, pairs):
    """The greedy rule written out plainly: each round, the k best single additions to S."""
    selected = []
    for _ in range(rounds):
        remaining = [h for h in HEADS if h not in selected]
        mean = {h: sum(toy_score([((*selected, h), p)])[0] for p in range(pairs)) / pairs for h in remaining}
        selected += sorted(remaining, key=lambda h: -mean[h])[:top_k]
    return selected


def run(store, rounds=2, top_k=3, pairs=4, racing=None, batch=5, score=toy_score):
    results = greedy_search(HEADS, pairs, score, store, rounds, top_k, batch, racing, progress=False)
    return [(path, int(head)) for r in results for path, head in (s.head.rsplit(":", 1) for s in r.selected)]


def test_greedy_order_and_top_k_follow_the_rule():
    selected = run(ScoreStore(None, {}), rounds=3, top_k=2)
    assert selected == brute_force_greedy(3, 2, 4)
    # the crowding penalty makes round 2 depend on round 1: plain top-6 by value is all of layer0
    assert selected[:2] == [("layer0", 5), ("layer0", 4)]
    assert all(path != "layer0" for path, _ in selected[2:])


def test_round_results_hold_base_and_gain():
    store = ScoreStore(None, {})
    results = greedy_search(HEADS, 2, toy_score, store, 2, 2, 4, None, progress=False)
    assert [r.round for r in results] == [1, 2]
    assert results[0].base_score == pytest.approx(0.005)  # S empty: only the pair offsets
    first = results[0].selected
    chosen = tuple((path, int(head)) for path, head in (s.head.rsplit(":", 1) for s in first))
    assert results[1].base_score == pytest.approx(sum(toy_score([(chosen, p) for p in range(2)])) / 2)
    assert first[0].score >= first[1].score


def test_racing_selects_the_exhaustive_set_with_fewer_images():
    calls = []

    def noisy(items):  # pair-dependent noise, so early pairs can mislead a little
        calls.append(len(items))
        return [s + 0.02 * ((hash((heads, pair)) % 7) - 3) / 3 for s, (heads, pair) in zip(toy_score(items), items)]

    exhaustive = run(ScoreStore(None, {}), rounds=1, top_k=3, pairs=8, score=noisy)
    images_exhaustive = sum(calls)
    calls.clear()
    raced = run(ScoreStore(None, {}), rounds=1, top_k=3, pairs=8, racing=Racing(first_pairs=1), score=noisy)
    assert set(raced) == set(exhaustive)
    assert sum(calls) < images_exhaustive / 2


def test_batches_are_the_given_size():
    sizes = []

    def record(items):
        sizes.append(len(items))
        return toy_score(items)

    run(ScoreStore(None, {}), rounds=1, pairs=1, batch=7, score=record)
    assert sizes[:-1] == [7] * (len(sizes) - 1) and sum(sizes) == len(HEADS) + 1  # every head and the base


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path):
    settings = {"objective": "toy"}
    reference = run(ScoreStore(tmp_path / "full.json", settings), racing=Racing())
    full_scores = json.loads((tmp_path / "full.json").read_text())["scores"]

    budget = itertools.count()

    def interrupted(items):
        if next(budget) == 6:
            raise KeyboardInterrupt
        return toy_score(items)

    with pytest.raises(KeyboardInterrupt):
        run(ScoreStore(tmp_path / "cut.json", settings), racing=Racing(), score=interrupted)
    saved = json.loads((tmp_path / "cut.json").read_text())["scores"]
    assert 0 < len(saved) < len(full_scores)
    seen = []

    def resumed_score(items):
        seen.extend(items)
        return toy_score(items)

    resumed = run(ScoreStore(tmp_path / "cut.json", settings), racing=Racing(), score=resumed_score)
    assert resumed == reference
    assert json.loads((tmp_path / "cut.json").read_text())["scores"] == full_scores
    assert len(seen) == len(full_scores) - len(saved)  # nothing scored twice


def test_a_checkpoint_with_other_settings_is_refused(tmp_path):
    ScoreStore(tmp_path / "c.json", {"top_k": 3}).put([(ScoreStore.key(1, BASE, 0), 1.0)])
    with pytest.raises(ValueError, match=r"other settings \(\['top_k'\]\).*same settings"):
        ScoreStore(tmp_path / "c.json", {"top_k": 4})


def test_processes_split_batches_and_keep_their_order(monkeypatch):
    import accelerate.utils

    done = []

    def work(batch):
        done.append(batch)
        return [batch * 10]

    # two processes, simulated: each computes its share; the "gather" adds the other process's results
    other = [(0, [0]), (2, [20])]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: other + mine)
    assert Processes(rank=1, count=2).run([0, 1, 2, 3], work) == [[0], [10], [20], [30]]
    assert done == [1, 3]


def test_racing_rejects_bad_settings():
    with pytest.raises(ValueError, match="keep"):
        Racing(keep=1.0)
    with pytest.raises(ValueError, match="first_pairs"):
        Racing(first_pairs=0)


def test_only_the_writing_process_saves_the_checkpoint(tmp_path):
    ScoreStore(tmp_path / "other.json", {}, write=False).put([(ScoreStore.key(1, BASE, 0), 1.0)])
    assert not (tmp_path / "other.json").exists()
    ScoreStore(tmp_path / "first.json", {}).put([(ScoreStore.key(1, BASE, 0), 1.0)])
    assert ScoreStore(tmp_path / "first.json", {}, write=False).get(1, BASE, 0) == 1.0
