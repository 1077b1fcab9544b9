"""Training batches, and the one row packer every producer uses.

A training row is a prompt followed by a completion. Every producer (the
rollout, the generations loop's selection, code self-play, supervised
warm-starts, preference pairs) turns its rows into a `Batch` or a `PairBatch`
through `pack_rows`, in one of two layouts:

- split (`prompt_width` given): prompts left-padded to P, completions from
  column P on, right-padded to C: the sampler's layout. `Batch.loss_start` is
  P, so the update runs the output head on completion positions only (as TRL's
  `logits_to_keep`).
- packed (no `prompt_width`): each completion right after its own prompt, the
  row right-padded: the narrowest layout for prompts of very different lengths.

Producers never import the update step, and the step imports no producer: this
module is what both sides share.

Batches are `flax.struct.dataclass` pytrees: their arrays are leaves, and
`loss_start` is a static field, so the jitted step compiles once per prompt
width on its own, without a separate static argument.

Dimension legend (docs/dimensions.md): B rows (pairs for a PairBatch),
T positions, P prompt width, C completion width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import numpy as np
from jaxtyping import Array, Bool, Float, Int


@flax.struct.dataclass
class Batch:
    """Rows of prompt + completion tokens and what a token-level objective reads of them.

    Attributes:
      tokens: prompt and completion tokens [B, T] (padding anywhere).
      attention_mask: [B, T] True for real tokens, False for padding.
      loss_mask: [B, T] True for the completion tokens the loss is on.
      old_logp: [B, T] log-prob of each token under the policy that sampled it
        (the sampler's), `old_logp[b, t] = log p(tokens[b, t] | tokens[b, :t])`;
        read only where `loss_mask` is True.
      advantages: one per row [B], or one per token [B, T].
      ref_logp: optional [B, T] reference log-probs computed elsewhere; when
        None and the state holds reference parameters, the objective computes them.
      rollout_logp: optional [B, T] log-probs under the policy that sampled the
        tokens when it is not the one `old_logp` is of (another engine or
        precision, stale weights); with `importance_upper` set, the
        policy-gradient objective weights each token by pi_old / pi_rollout.
      loss_start: (static) first position that can carry a loss token, e.g. the
        prompt width P of the split layout; loss-mask entries before it are ignored.
    """

    tokens: Int[Array, "B T"]
    attention_mask: Bool[Array, "B T"]
    loss_mask: Bool[Array, "B T"]
    old_logp: Float[Array, "B T"]
    advantages: Float[Array, " B"] | Float[Array, "B T"]
    ref_logp: Float[Array, "B T"] | None = None
    rollout_logp: Float[Array, "B T"] | None = None
    loss_start: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class PairBatch:
    """Preference pairs: a chosen and a rejected row per pair, in the split layout.

    Attributes:
      chosen_tokens, rejected_tokens: [B, P + C] prompt (left-padded to P), then
        the response (right-padded to C).
      chosen_mask, rejected_mask: [B, P + C] True on real tokens.
      pair_mask: [B] True for real pairs, False for padding pairs.
      ref_chosen_logp, ref_rejected_logp: optional [B] summed response
        log-probs under the reference, computed elsewhere; when None the
        objective computes them from the state's reference parameters.
      loss_start: (static) the prompt width P: responses start there.
    """

    chosen_tokens: Int[Array, "B T"]
    chosen_mask: Bool[Array, "B T"]
    rejected_tokens: Int[Array, "B T"]
    rejected_mask: Bool[Array, "B T"]
    pair_mask: Bool[Array, " B"]
    ref_chosen_logp: Float[Array, " B"] | None = None
    ref_rejected_logp: Float[Array, " B"] | None = None
    loss_start: int = flax.struct.field(pytree_node=False, default=0)


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def pack_rows(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    advantages: Sequence[float] | np.ndarray | None = None,
    completion_logp: Sequence[Sequence[float]] | None = None,
    loss_rows: Sequence[bool] | np.ndarray | None = None,
    prompt_width: int | None = None,
    completion_width: int | None = None,
    width: int | None = None,
    num_rows: int | None = None,
    multiple: int = 16,
    pad_id: int = 0,
) -> Batch:
    """A numpy `Batch` of prompt + completion rows; the loss is on the completion tokens.

    Args:
      prompts, completions: token ids of each row (an empty completion is a row
        without loss tokens).
      advantages: one per row (default 1: plain likelihood, as in SFT).
      completion_logp: per row, the log-prob of each completion token under the
        policy that produced it (the old policy); default 0.
      loss_rows: per row, whether its completion enters the loss (default all).
      prompt_width: the split layout with prompts left-padded to this width;
        None: the packed layout.
      completion_width: split layout: the completion columns (default: the
        longest completion rounded up to `multiple`).
      width: packed layout: the row width (default: the longest row rounded up
        to `multiple`, so that few widths, and few compiled programs, occur).
      num_rows: pad the batch with empty rows (no tokens, no loss, advantage 0)
        up to this many rows.
      pad_id: the token id of padding.

    Returns:
      The batch, with `loss_start` = `prompt_width` (0 for the packed layout).

    Raises:
      ValueError: naming the row, for one longer than its width, or when the
        rows do not fit in `num_rows`.
    """
    R = len(prompts)
    if len(completions) != R:
        raise ValueError(f"pack_rows: {R} prompts but {len(completions)} completions")
    rows = R if num_rows is None else num_rows
    if rows < R:
        raise ValueError(f"pack_rows: {R} rows do not fit in num_rows={rows}")
    if prompt_width is not None:
        C = completion_width if completion_width is not None else _round_up(
            max((len(c) for c in completions), default=1), multiple)
        T = prompt_width + C
    else:
        T = width if width is not None else _round_up(
            max((len(p) + len(c) for p, c in zip(prompts, completions, strict=True)), default=1), multiple)
    tokens = np.full((rows, T), pad_id, np.int32)
    attention = np.zeros((rows, T), bool)
    loss_mask = np.zeros((rows, T), bool)
    old_logp = np.zeros((rows, T), np.float32)
    in_loss = np.ones(R, bool) if loss_rows is None else np.asarray(loss_rows, bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p, c = len(prompt), len(completion)
        if prompt_width is not None:
            if p > prompt_width:
                raise ValueError(f"pack_rows: row {i}: the prompt has {p} tokens, more than the prompt "
                                 f"width {prompt_width}")
            if c > T - prompt_width:
                raise ValueError(f"pack_rows: row {i}: the completion has {c} tokens, more than the "
                                 f"completion width {T - prompt_width}")
            start = prompt_width - p
        else:
            if p + c > T:
                raise ValueError(f"pack_rows: row {i} has {p + c} tokens, more than the width {T}")
            start = 0
        split = start + p
        tokens[i, start:split] = prompt
        tokens[i, split:split + c] = completion
        attention[i, start:split + c] = True
        loss_mask[i, split:split + c] = in_loss[i]
        if completion_logp is not None:
            old_logp[i, split:split + c] = completion_logp[i]
    adv = np.zeros(rows, np.float32)
    adv[:R] = 1.0 if advantages is None else np.asarray(advantages, np.float32).reshape(R)
    return Batch(tokens, attention, loss_mask, old_logp, adv, loss_start=prompt_width or 0)


# ---------------------------------------------------------------------------
# Preference pairs


class EncodedPairs(NamedTuple):
    """Token ids of preference pairs: `prompts[i]`, `chosen[i]`, `rejected[i]` form pair i."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.prompts)

    def take(self, rows: Sequence[int]) -> EncodedPairs:
        return EncodedPairs(*[[side[i] for i in rows] for side in self])


def pair_widths(pairs: EncodedPairs, multiple: int = 8) -> tuple[int, int]:
    """Prompt and response widths that fit every pair, rounded up to `multiple`."""
    longest_response = max(max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected, strict=True))
    return _round_up(max(len(p) for p in pairs.prompts), multiple), _round_up(longest_response, multiple)


def pack_pairs(
    pairs: EncodedPairs, *, prompt_width: int, completion_width: int, num_rows: int | None = None,
    pad_id: int = 0,
) -> PairBatch:
    """A numpy `PairBatch` of the pairs (split layout), padded with masked-out pairs up to `num_rows`.

    Raises:
      ValueError: naming the pair and the side for an empty prompt or response,
        or one longer than its width.
    """
    B = pairs.size
    rows = B if num_rows is None else num_rows
    if rows < B:
        raise ValueError(f"pack_pairs: {B} pairs do not fit in num_rows={rows}")
    for side, responses in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
        for i, (prompt, response) in enumerate(zip(pairs.prompts, responses, strict=True)):
            for what, ids, limit in (("prompt", prompt, prompt_width),
                                     (f"{side} response", response, completion_width)):
                if not ids:
                    raise ValueError(f"pack_pairs: pair {i} has an empty {what}")
                if len(ids) > limit:
                    raise ValueError(f"pack_pairs: pair {i}: {what} has {len(ids)} tokens, "
                                     f"more than its width {limit}")
    sides = [pack_rows(pairs.prompts, responses, prompt_width=prompt_width, completion_width=completion_width,
                       num_rows=rows, pad_id=pad_id) for responses in (pairs.chosen, pairs.rejected)]
    return PairBatch(sides[0].tokens, sides[0].attention_mask, sides[1].tokens, sides[1].attention_mask,
                     np.arange(rows) < B, loss_start=prompt_width)
