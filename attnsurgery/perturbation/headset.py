"""Head sets: the result of a head search, saved as JSON and loaded by ``PerturbedAttention(heads=Path)``.

A head set is tied to an architecture, not to a checkpoint: it records a digest of the model's
perturbable layers (their paths and head counts). Loading it for a model whose layers differ fails and
says how; a fine-tune of the same architecture loads it (head roles often survive fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..inventory import ModelInfo

__all__ = ["Head", "HeadSet", "RoundResult", "SelectedHead", "perturbable_layers", "model_fingerprint"]

FORMAT = "attnsurgery-headset"
VERSION = 1
#: Layer kinds whose heads perturbation guidance can perturb (image tokens attending to themselves).
SELF_KINDS = ("self", "joint", "single")

#: A head as (layer path, head index).
Head = tuple[str, int]


def head_name(head: Head) -> str:
    """The ``"path:head"`` spelling every selector accepts."""
    return f"{head[0]}:{head[1]}"


def parse_head_name(name: str) -> Head:
    """Inverse of :func:`head_name`."""
    path, _, index = name.rpartition(":")
    if not path or not index.isdigit():
        raise ValueError(f"head {name!r} is not of the form 'layer.path:head_index'")
    return path, int(index)


def perturbable_layers(model: ModelInfo) -> list[tuple[str, int]]:
    """(path, heads) of every layer perturbation guidance can act on, in model order."""
    return [(layer.path, layer.heads) for layer in model.layers if layer.kind in SELF_KINDS]


def model_fingerprint(model: ModelInfo) -> dict[str, Any]:
    """Family and a digest of the perturbable layers: what a head set must match to be loaded."""
    layers = perturbable_layers(model)
    digest = hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:16]
    return {
        "family": model.family.name,
        "layers": len(layers),
        "heads": sum(h for _, h in layers),
        "layer_digest": digest,
    }


@dataclass(frozen=True)
class SelectedHead:
    """One head added in a round, with the objective's mean score for the set that added it."""

    head: str
    score: float
    pairs: int


@dataclass(frozen=True)
class RoundResult:
    """One greedy round: the score of the set it started from and the heads it added, best first."""

    round: int
    base_score: float
    selected: tuple[SelectedHead, ...]


@dataclass(frozen=True)
class HeadSet:
    """The heads a search selected, where they came from, and how they were found.

    Example:
        >>> heads = HeadSet.load("heads.json")
        >>> handle = surg.apply(pipe, surg.PerturbedAttention(scale=3.0, heads=Path("heads.json")))
    """

    heads: tuple[str, ...]
    fingerprint: dict[str, Any]
    rounds: tuple[RoundResult, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": FORMAT, "version": VERSION, **data}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head set as JSON (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "head set") -> HeadSet:
        if data.get("format") != FORMAT:
            raise ValueError(f'{source} is not an attnsurgery head set (no "format": "{FORMAT}" key)')
        if data.get("version") != VERSION:
            raise ValueError(f"{source} has head-set version {data.get('version')}; this attnsurgery reads {VERSION}")
        rounds = tuple(
            RoundResult(r["round"], r["base_score"], tuple(SelectedHead(**s) for s in r["selected"]))
            for r in data.get("rounds", ())
        )
        return cls(tuple(data["heads"]), dict(data["fingerprint"]), rounds, dict(data.get("settings", {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadSet:
        """Read a head set written by :meth:`save` (``attnsurgery hunt --out``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"head-set file {str(path)!r} does not exist; write one with `attnsurgery hunt`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"head-set file {str(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(data, source=f"head-set file {str(path)!r}")

    def heads_for(self, model: ModelInfo) -> list[str]:
        """The heads as ``"path:head"`` strings after checking that they belong to ``model``'s architecture.

        Raises:
            ValueError: the model's family or perturbable layers differ from the searched model's.
        """
        mine = model_fingerprint(model)
        theirs = self.fingerprint
        if mine["family"] != theirs.get("family") or mine["layer_digest"] != theirs.get("layer_digest"):
            raise ValueError(
                f"this head set was searched on a {theirs.get('family')} model with {theirs.get('layers')} "
                f"perturbable layers ({theirs.get('heads')} heads, digest {theirs.get('layer_digest')}), but the "
                f"model here is {mine['family']} with {mine['layers']} layers ({mine['heads']} heads, digest "
                f"{mine['layer_digest']}); run `attnsurgery hunt` on this model, or pass heads explicitly"
            )
        return list(self.heads)
