"""A faithful stand-in of vLLM's persistent batch, for the tests and the CUDA check of the plugin.

vLLM itself is not installed in CI (a 336 MB CUDA wheel pinning its own torch), so
:class:`PersistentBatch` reproduces the documented ``BatchUpdate`` semantics (vLLM
``docs/design/logits_processors.md``): finished requests are replaced by new ones lowest index
first, extra new ones extend the batch, the rest are removed and the batch is condensed by
unidirectional moves from the highest slot, then swaps reorder it; ``removed`` comes sorted
descending, ``added`` carries the request's live output list, which the "engine" appends to.
The interface types mirror ``vllm.v1.sample.logits_processor.interface``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


@dataclass(frozen=True)
class BatchUpdate:
    batch_size: int
    removed: Sequence[int]
    added: Sequence[tuple]  # (index, SamplingParams, prompt_tok_ids, output_tok_ids)
    moved: Sequence[tuple]  # (a, b, MoveDirectionality)


@dataclass
class SamplingParams:
    extra_args: Optional[dict] = None
    structured_outputs: Any = None  # vLLM's own structured-output request (None: none)


@dataclass(eq=False)
class Request:
    config: Any  # extra_args["safedecode"], or None for an unguarded request
    adversarial: bool = False
    output: list = field(default_factory=list)
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(None if self.config is None else {"safedecode": self.config, "other": 1})


class PersistentBatch:
    """The engine side: slots of requests, and the BatchUpdate each step's changes produce."""

    def __init__(self):
        self.slots: list[Optional[Request]] = []

    def step(self, new: list[Request], swaps: list[tuple[int, int]]) -> Optional[BatchUpdate]:
        finished = sorted(i for i, r in enumerate(self.slots) if r is not None and r.done)
        added, removed, moved = [], [], []
        for i in finished:
            if new:
                self.slots[i] = req = new.pop(0)
                added.append((i, req.params, [1, 2, 3], req.output))
            else:
                self.slots[i] = None
                removed.append(i)
        for req in new:
            self.slots.append(req)
            added.append((len(self.slots) - 1, req.params, [1, 2, 3], req.output))
        while None in self.slots:  # condense: fill the lowest hole from the highest occupied slot
            hole = self.slots.index(None)
            last = max(i for i, r in enumerate(self.slots) if r is not None) if any(self.slots) else -1
            if last < hole:
                del self.slots[hole:]
                break
            self.slots[hole], self.slots[last] = self.slots[last], None
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        for a, b in swaps:
            if a < len(self.slots) and b < len(self.slots) and a != b:
                self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
                moved.append((a, b, MoveDirectionality.SWAP))
        if not (added or removed or moved):
            return None
        return BatchUpdate(len(self.slots), sorted(removed, reverse=True), added, moved)
