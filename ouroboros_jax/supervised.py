"""Supervised fine-tuning through the update step: warm-starts and expert iteration.

Supervised training is the update step with the "sft" loss variant: the loss
is -A * log p(token) averaged over answer tokens, so with A = 1 it is the
negative log-likelihood of the gold answer (a warm-start), and with A = a
verified reward it is rejection-sampling fine-tuning. The same compiled step,
shardings and micro-batching serve both RL and supervised updates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.train_step import Batch, init_train_state, make_optimizer, make_train_step

SFT_LOSS = dict(variant="sft", clip_low=0.0, clip_high=0.0, aggregation="token_mean", kl_coef=0.0)


def sft_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], length: int,
              weights: Sequence[float] | None = None, pad_id: int = 0) -> Batch:
    """Right-padded prompt + answer rows with the loss on the answer tokens.

    Args:
      prompts, answers: token ids per row.
      length: the padded width (rows longer than this are an error naming the row).
      weights: one advantage per row (default 1: plain likelihood).
    """
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    attention = np.zeros((B, length), bool)
    loss_mask = np.zeros((B, length), bool)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        n = len(p) + len(a)
        if n > length:
            raise ValueError(f"sft_batch: row {i} has {n} tokens, more than the width {length}")
        tokens[i, :n] = [*p, *a]
        attention[i, :n] = True
        loss_mask[i, len(p):n] = True
    adv = np.ones(B, np.float32) if weights is None else np.asarray(weights, np.float32)
    return Batch(tokens, attention, loss_mask, np.zeros((B, length), np.float32), adv)


def supervised_warmstart(
    params: Params, model_config: ModelConfig, source: Any, *,
    encode: Callable[[Sequence[Any]], list[list[int]]], answer_ids: Callable[[Any], list[int]],
    steps: int, batch_size: int, learning_rate: float, seed: int = 0, mesh: Any = None,
    length: int | None = None, log_every: int = 0,
    until: Callable[[Params, int], bool] | None = None, check_every: int = 50,
) -> Params:
    """Train on gold answers for `steps` steps of `batch_size` examples; returns new params.

    Args:
      source: a prompt source with `take(n)` (examples carry their gold answer).
      encode: examples -> prompt ids; `answer_ids`: example -> answer ids (end with EOS).
      length: padded row width; default: the longest row of the first batch, rounded up to 8,
        plus 8 (one compiled program for the whole run).
      until: optional early stop, called as `until(params, step)` every `check_every` steps;
        training ends (before `steps`) the first time it returns True.
    """
    if steps <= 0:
        return params
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    optimizer = make_optimizer(learning_rate, b2=0.99)
    step_fn, shardings = make_train_step(model_config, optimizer, mesh, with_reference=False, **SFT_LOSS)
    state = init_train_state(jax.tree.map(lambda x: x.copy(), params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    for i in range(steps):
        examples = source.take(batch_size)
        prompts, answers = encode(examples), [answer_ids(ex) for ex in examples]
        if length is None:
            longest = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
            length = -(-longest // 8) * 8 + 8
        state, metrics = step_fn(state, sft_batch(prompts, answers, length))
        if log_every and (i + 1) % log_every == 0:
            print(f"warm-start step {i + 1}: loss {float(metrics['loss']):.4f}", flush=True)
        if until is not None and (i + 1) % check_every == 0 and until(state.params, i + 1):
            break
    return state.params
