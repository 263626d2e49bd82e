"""Micro-batches: which samples go through one forward/backward together, and their tensors.

A rank's share of a step is split into mini-batches (one optimizer update each) and every mini-batch into
micro-batches (gradients accumulate over them). The split follows a token budget rather than a fixed
count: samples are sorted by length and binned so that a micro-batch's cost stays within
`trainer.micro_batch_tokens` - rows x padded length in the padded layout, total length when packed - so a
batch of short answers runs in few large micro-batches and a long one in many small ones, and nothing is
padded to the batch's longest sample.

Everything here is pure (no torch.distributed): agreeing on the micro-batch count across ranks is the
engine's job (FSDP runs collectives in every forward and backward, so every rank must run as many).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


@dataclass
class Sample:
    """One trajectory as the trainer sees it; per-token fields are aligned with `response_ids`."""

    prompt_ids: list[int]
    response_ids: list[int]
    behaviour: torch.Tensor  # (R,) logprob of each response token under the policy that sampled it
    loss_mask: torch.Tensor  # (R,) float: 1 where the token counts (0 on tool tokens of a multi-turn response)
    reward: float
    group: int
    version: int  # policy version that produced the sample

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def samples_from_columns(cols: dict[str, list[Any]]) -> list[Sample]:
    """Samples from the data store's columns (prompt_ids, response_ids, logprobs, reward, group, version and
    an optional loss_mask). Missing logprobs (a short list) are padded with 0 and do not count."""
    out = []
    n = len(cols["response_ids"])
    masks = cols.get("loss_mask") or [None] * n
    for p, r, lp, rew, g, v, m in zip(cols["prompt_ids"], cols["response_ids"], cols["logprobs"], cols["reward"],
                                      cols["group"], cols["version"], masks):
        if not p:
            raise ValueError(f"sample of group {g} has an empty prompt: its first response token has no context")
        lp = [x if x is not None else 0.0 for x in (lp or [])][: len(r)]
        mask = torch.ones(len(r)) if m is None else torch.tensor(m[: len(r)], dtype=torch.float32)
        mask[len(lp):] = 0.0
        behaviour = torch.zeros(len(r))
        behaviour[: len(lp)] = torch.tensor(lp, dtype=torch.float32)
        out.append(Sample(list(p), list(r), behaviour, mask, float(rew), int(g), int(v)))
    return out


def pad_stack(rows: Sequence[torch.Tensor], width: Optional[int] = None, value: float = 0.0) -> torch.Tensor:
    """(n, width) tensor of right-padded 1-D rows; at least (1, 1) so empty input still has a shape."""
    width = max([width or 0, 1, *(len(r) for r in rows)])
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((max(len(rows), 1), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# ---------------------------------------------------------------- planning

def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def plan_micro_batches(lengths: Sequence[int], token_budget: int = 0, max_samples: int = 0,
                       packed: bool = False, multiple: int = 1) -> list[list[int]]:
    """Indexes of the samples of each micro-batch, longest samples first.

    padded: a micro-batch costs rows x its longest length; sorted by length, each bin takes samples while
    that product stays within the budget (so it pads only up to the bin's own longest).
    packed: a micro-batch costs the sum of its lengths; first-fit decreasing.
    Lengths count rounded up to `multiple` (the padded length `collate` gives the row). A sample longer
    than the budget trains alone. `max_samples` caps rows per micro-batch. With neither a budget nor a
    cap, everything is one micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    cap = max_samples if max_samples > 0 else len(order)
    budget = token_budget if token_budget > 0 else float("inf")
    if packed:
        bins: list[list[int]] = []
        used: list[int] = []
        for i in order:
            for b, content in enumerate(bins):
                if round_up(used[b] + lengths[i], multiple) <= budget and len(content) < cap:
                    content.append(i)
                    used[b] += lengths[i]
                    break
            else:
                bins.append([i])
                used.append(lengths[i])
        return bins
    bins = [[order[0]]]
    for i in order[1:]:
        cur = bins[-1]
        longest = round_up(lengths[cur[0]], multiple)
        if len(cur) < cap and (len(cur) + 1) * longest <= budget:
            cur.append(i)
        else:
            bins.append([i])
    return bins


def split_mini_batches(n: int, k: int) -> list[list[int]]:
    """Sample indexes 0..n-1 in k contiguous, nearly equal parts (every rank holds as many samples)."""
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def padded_tokens(lengths: Sequence[int], plan: list[list[int]], packed: bool, multiple: int = 1) -> int:
    """Token positions the plan computes on (real tokens plus padding)."""
    if packed:
        return sum(round_up(sum(lengths[i] for i in b), multiple) for b in plan if b)
    return sum(len(b) * round_up(max(lengths[i] for i in b), multiple) for b in plan if b)


# ---------------------------------------------------------------- tensors

@dataclass
class MicroBatch:
    """Model inputs for some samples, and where each response token's prediction sits in the logits.

    `positions[i, j]` indexes the flattened (rows * length) logits at the position that predicts response
    token j of sample i; `mask` is 0 past a sample's response (and on tokens that do not count). An empty
    micro-batch (a rank with fewer than the agreed count) is one dummy row with an all-zero mask: it runs
    forward and backward (FSDP's collectives need it) and adds nothing.
    """

    input_ids: torch.Tensor  # (rows, L)
    attention_mask: Optional[torch.Tensor]  # (rows, L) padded layout; None when packed
    position_ids: Optional[torch.Tensor]  # (1, L) packed layout (restarts at 0 for every sample); else None
    positions: torch.Tensor  # (n, R) long
    targets: torch.Tensor  # (n, R) long: the response tokens
    mask: torch.Tensor  # (n, R) float
    index: list[int]  # which samples of the batch, in row order of positions/targets/mask

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                          move(self.positions), move(self.targets), move(self.mask), self.index)

    @property
    def width(self) -> int:
        return self.positions.shape[1]

    def field(self, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
        """A per-token field of the batch's samples (each (R_i,)) laid out like `mask`."""
        if not self.index:
            return torch.zeros_like(self.mask)
        return pad_stack([per_sample[i] for i in self.index], self.width).to(self.mask.device)


def collate(samples: Sequence[Sample], index: Sequence[int], packed: bool = False, pad_id: int = 0,
            multiple: int = 1) -> MicroBatch:
    """Tensors for the samples `index` of `samples` (empty index: the dummy micro-batch). The sequence
    length is rounded up to `multiple` (packed: the tail is a run of padding with its own positions), so
    micro-batch shapes repeat from step to step and per-shape kernel plans are reused."""
    chosen = [samples[i] for i in index]
    if not chosen:
        ids = torch.full((1, 2), pad_id, dtype=torch.long)
        attn = None if packed else torch.ones_like(ids)
        pos_ids = torch.arange(2)[None] if packed else None
        zeros = torch.zeros((1, 1), dtype=torch.long)
        return MicroBatch(ids, attn, pos_ids, zeros, zeros.clone(), torch.zeros((1, 1)), [])
    width = max(len(s.response_ids) for s in chosen)
    positions = torch.zeros((len(chosen), width), dtype=torch.long)
    targets = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chosen), width))
    if packed:
        total = sum(s.length for s in chosen)
        ids = torch.full((1, round_up(total, multiple)), pad_id, dtype=torch.long)
        pos_ids = torch.zeros((1, ids.shape[1]), dtype=torch.long)
        pos_ids[0, total:] = torch.arange(ids.shape[1] - total)
        attn = None
    else:
        longest = round_up(max(s.length for s in chosen), multiple)
        ids = torch.full((len(chosen), longest), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        pos_ids = None
    offset = 0
    for i, s in enumerate(chosen):
        seq = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        p, r = len(s.prompt_ids), len(s.response_ids)
        if packed:
            ids[0, offset : offset + len(seq)] = seq
            pos_ids[0, offset : offset + len(seq)] = torch.arange(len(seq))
            start = offset + p - 1
            offset += len(seq)
        else:
            ids[i, : len(seq)] = seq
            attn[i, : len(seq)] = 1
            start = i * ids.shape[1] + p - 1
        positions[i, :r] = torch.arange(start, start + r)
        positions[i, r:] = start  # any valid index; masked out
        targets[i, :r] = seq[p:]
        mask[i, :r] = s.loss_mask
    return MicroBatch(ids, attn, pos_ids, positions, targets, mask, list(index))
