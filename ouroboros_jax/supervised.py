"""Supervised fine-tuning through the update step: warm-starts and expert iteration.

Supervised training is the one update step with the `objectives.sft`
objective: the loss is -A * log p(token) averaged over answer tokens, so with
A = 1 it is the negative log-likelihood of the gold answer (a warm-start), and
with A = a verified reward it is rejection-sampling fine-tuning. The same
compiled step, shardings and micro-batching serve RL and supervised updates;
rows are packed by `batch.pack_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from ouroboros_jax.batch import pack_rows
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.models.transformer import Params, param_specs
from ouroboros_jax.objectives import sft
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step


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
    step_fn, shardings = make_train_step(sft(model_config), optimizer, mesh, param_specs(model_config))
    state = init_train_state(jax.tree.map(lambda x: x.copy(), params), optimizer, jax.random.key(seed),
                             shardings=shardings)
    for i in range(steps):
        examples = source.take(batch_size)
        prompts, answers = encode(examples), [answer_ids(ex) for ex in examples]
        if length is None:
            longest = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
            length = -(-longest // 8) * 8 + 8
        state, metrics = step_fn(state, pack_rows(prompts, answers, width=length))
        if log_every and (i + 1) % log_every == 0:
            print(f"warm-start step {i + 1}: loss {float(metrics['loss']):.4f}", flush=True)
        if until is not None and (i + 1) % check_every == 0 and until(state.params, i + 1):
            break
    return state.params
