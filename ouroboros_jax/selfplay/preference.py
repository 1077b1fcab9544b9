"""Offline preference learning: pairs from JSONL, DPO / IPO with a frozen reference, SPIN.

Preference data are (prompt, chosen, rejected) triples. They become a
`PairBatch`: for each pair a chosen and a rejected row, each the prompt
left-padded to a prompt width P followed by the response right-padded to a
response width N (the sampler's layout), so the output head runs on the
response positions only (`start=P`).

One jitted update step (`preference_step`, compiled by `make_preference_step`
with explicit shardings and the state donated) trains the policy on a batch of
pairs: summed response log-probs under the policy and under the frozen
reference parameters held in the state, then `algorithms.dpo_loss` (``dpo``
objective, variants ``sigmoid`` and ``ipo``) or `algorithms.spin_loss`
(``spin``). The state is the update step's `TrainState` with `ref_params`.

SPIN (Chen et al. 2024, arXiv 2401.01335) runs iterations: the current model
M_t samples a response per prompt, each pair takes the gold response as chosen
and M_t's sample as rejected, and M_{t+1} is trained from M_t with M_t as the
reference (the "opponent").

Dimension legend: B pairs, T time (P prompt then N response positions).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ouroboros_jax.algorithms import dpo_loss, spin_loss
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import DataError
from ouroboros_jax.models.logprobs import policy_logprobs
from ouroboros_jax.models.transformer import Params
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.train_step import (
    TrainState,
    init_train_state,
    learning_rate_of,
    make_optimizer,
    train_state_shardings,
)

Metrics = dict[str, Float[Array, ""]]
OBJECTIVES: tuple[str, ...] = ("dpo", "spin")

# ---------------------------------------------------------------------------
# Preference data


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One human (or synthetic) judgement: `chosen` is preferred to `rejected` for `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    id: str = ""


def read_preference_pairs(
    path: str | os.PathLike[str], *, prompt_field: str = "prompt", chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> list[PreferencePair]:
    """Every pair of a JSONL file, one JSON object per line; ids are "<file stem>:<line>".

    Raises:
      DataError: naming the file and line for invalid JSON, a missing field or a
        field that is not a string (empty prompts included), and for a file with
        no pairs.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    pairs = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            values = []
            for name in (prompt_field, chosen_field, rejected_field):
                if name not in record:
                    raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
                if not isinstance(record[name], str):
                    raise DataError(f"{where}: field {name!r} must be a string (got {record[name]!r:.80})")
                values.append(record[name])
            if not values[0].strip():
                raise DataError(f"{where}: field {prompt_field!r} is empty")
            pairs.append(PreferencePair(*values, id=f"{file.stem}:{lineno}"))
    if not pairs:
        raise DataError(f"{file}: no preference pairs (no JSON lines)")
    return pairs


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


def encode_pairs(
    pairs: Sequence[PreferencePair], encode_prompt: Callable[[str], list[int]],
    encode_response: Callable[[str], list[int]],
) -> EncodedPairs:
    """Token ids of every pair (`encode_response` should end a response with EOS)."""
    return EncodedPairs([list(encode_prompt(p.prompt)) for p in pairs],
                        [list(encode_response(p.chosen)) for p in pairs],
                        [list(encode_response(p.rejected)) for p in pairs])


class PairBatch(NamedTuple):
    """A batch of pairs: chosen and rejected rows [B, P + N], and which pairs are real.

    Attributes:
      chosen_tokens, rejected_tokens: prompt (left-padded to P) then response
        (right-padded to N).
      chosen_mask, rejected_mask: True on real tokens.
      pair_mask: [B] True for real pairs, False for padding pairs.
    """

    chosen_tokens: Int[Array, "B T"]
    chosen_mask: Bool[Array, "B T"]
    rejected_tokens: Int[Array, "B T"]
    rejected_mask: Bool[Array, "B T"]
    pair_mask: Bool[Array, " B"]


def pair_widths(pairs: EncodedPairs, multiple: int = 8) -> tuple[int, int]:
    """Prompt and response widths that fit every pair, rounded up to `multiple`."""
    up = lambda n: -(-max(n, 1) // multiple) * multiple
    longest_response = max(max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected, strict=True))
    return up(max(len(p) for p in pairs.prompts)), up(longest_response)


def pair_batch(
    pairs: EncodedPairs, *, prompt_width: int, response_width: int, rows: int | None = None, pad_id: int = 0,
) -> PairBatch:
    """Numpy `PairBatch` of the pairs, padded with masked-out pairs up to `rows`.

    Raises:
      ValueError: naming the pair and the side for an empty prompt or response,
        or one longer than its width.
    """
    B = pairs.size
    rows = B if rows is None else rows
    if rows < B:
        raise ValueError(f"pair_batch: {B} pairs do not fit in rows={rows}")
    P, N = prompt_width, response_width
    out = {}
    for side, responses in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
        tokens = np.full((rows, P + N), pad_id, np.int32)
        mask = np.zeros((rows, P + N), bool)
        for i, (prompt, response) in enumerate(zip(pairs.prompts, responses, strict=True)):
            for what, ids, width in (("prompt", prompt, P), (f"{side} response", response, N)):
                if not ids:
                    raise ValueError(f"pair_batch: pair {i} has an empty {what}")
                if len(ids) > width:
                    raise ValueError(f"pair_batch: pair {i}: {what} has {len(ids)} tokens, "
                                     f"more than its width {width}")
            tokens[i, P - len(prompt):P] = prompt
            mask[i, P - len(prompt):P] = True
            tokens[i, P:P + len(response)] = response
            mask[i, P:P + len(response)] = True
        out[side] = (tokens, mask)
    return PairBatch(*out["chosen"], *out["rejected"], np.arange(rows) < B)


def epoch_batches(size: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """Row indices of step i: epochs of a seeded shuffle; a batch never spans two epochs.

    With fewer rows than `batch_size`, every step takes all rows.
    """
    per_epoch = max(size // batch_size, 1)

    def rows(step: int) -> np.ndarray:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        return order[k * batch_size:(k + 1) * batch_size]

    return rows


# ---------------------------------------------------------------------------
# The step


def sequence_logps(
    params: Params, model_config: ModelConfig, tokens: Int[Array, "B T"], mask: Bool[Array, "B T"], *,
    start: int, average: bool = False,
) -> Float[Array, " B"]:
    """Summed (or, with `average`, mean) log-prob of each row's tokens from position `start` on."""
    logp, _ = policy_logprobs(params, model_config, tokens, mask, with_entropy=False, start=start)
    response = mask & (jnp.arange(tokens.shape[1]) >= start)
    total = jnp.sum(jnp.where(response, logp, 0.0), axis=1)
    if average:
        total = total / jnp.maximum(jnp.sum(response, axis=1), 1)
    return total


def preference_step(
    state: TrainState, batch: PairBatch, *, model_config: ModelConfig,
    optimizer: optax.GradientTransformation, beta: float, objective: str = "dpo", variant: str = "sigmoid",
    label_smoothing: float = 0.0, average_logps: bool = False, loss_start: int = 0,
) -> tuple[TrainState, Metrics]:
    """One optimizer update of the policy on a batch of preference pairs.

    Args:
      state: policy parameters, optimizer state and the frozen `ref_params`.
      batch: the pairs (see `PairBatch`).
      model_config: the architecture.
      optimizer: the optax transformation the state was made with.
      beta: DPO's beta (IPO's tau, SPIN's lambda).
      objective: ``dpo`` (`algorithms.dpo_loss`) or ``spin`` (`algorithms.spin_loss`).
      variant: ``sigmoid`` or ``ipo``.
      label_smoothing: conservative DPO's flip probability (``dpo``, ``sigmoid`` only).
      average_logps: use the mean response log-prob instead of the sum (IPO's paper form).
      loss_start: the prompt width P: responses start there.

    Returns:
      `(new_state, metrics)`: the loss's metrics plus `grad_norm`, `finite` and
      `learning_rate`. A non-finite loss or gradient leaves the state unchanged.
    """
    if state.ref_params is None:
        raise ValueError("preference_step: the state has no ref_params (make it with with_reference=True)")
    B = batch.pair_mask.shape[0]
    tokens = jnp.concatenate([batch.chosen_tokens, batch.rejected_tokens])
    mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
    logps = lambda p: sequence_logps(p, model_config, tokens, mask, start=loss_start, average=average_logps)
    ref = jax.lax.stop_gradient(logps(state.ref_params))

    def loss_fn(params: Params) -> tuple[Float[Array, ""], Metrics]:
        policy = logps(params)
        args = (policy[:B], policy[B:], ref[:B], ref[B:])
        match objective:
            case "dpo":
                return dpo_loss(*args, beta=beta, variant=variant, label_smoothing=label_smoothing,
                                mask=batch.pair_mask)
            case "spin":
                return spin_loss(*args, beta=beta, variant=variant, mask=batch.pair_mask)
            case _:
                raise ValueError(f"unknown preference objective {objective!r}; expected one of {OBJECTIVES}")

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state._replace(
        step=state.step + finite.astype(state.step.dtype),
        params=keep_if_bad(optax.apply_updates(state.params, updates), state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state))
    metrics = metrics | {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    lr = learning_rate_of(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    return new_state, metrics


def make_preference_step(
    model_config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, **step_kwargs: Any,
):
    """`preference_step` jitted once with explicit shardings, the state donated.

    The state is sharded as the update step's (`train_step.train_state_shardings`
    with a reference), every batch array over (data, fsdp) on its leading axis.

    Returns:
      `(step_fn, state_shardings)`: `step_fn(state, batch, loss_start=0)`.
    """
    shardings = train_state_shardings(model_config, optimizer, mesh, with_reference=True)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def step(state: TrainState, batch: PairBatch, loss_start: int) -> tuple[TrainState, Metrics]:
        return preference_step(state, batch, model_config=model_config, optimizer=optimizer,
                               loss_start=loss_start, **step_kwargs)

    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                     static_argnums=2, donate_argnums=0)

    def step_fn(state: TrainState, batch: PairBatch, loss_start: int = 0) -> tuple[TrainState, Metrics]:
        return jitted(state, batch, loss_start)

    return step_fn, shardings


# ---------------------------------------------------------------------------
# Training loops


@dataclasses.dataclass
class PreferenceResult:
    params: Params
    history: list[dict[str, float]]


def train_preference(
    params: Params, model_config: ModelConfig, pairs: EncodedPairs, *, steps: int, batch_size: int,
    learning_rate: float, beta: float, objective: str = "dpo", variant: str = "sigmoid",
    label_smoothing: float = 0.0, average_logps: bool = False, ref_params: Params | None = None,
    mesh: Mesh | None = None, seed: int = 0, widths: tuple[int, int] | None = None,
    optimizer: optax.GradientTransformation | None = None, log_every: int = 0,
) -> PreferenceResult:
    """DPO / IPO / SPIN training on encoded pairs for `steps` updates of `batch_size` pairs.

    Args:
      params: the initial policy (not modified).
      pairs: the training pairs.
      ref_params: the frozen reference; default: a copy of `params`.
      widths: (prompt_width, response_width); default: `pair_widths(pairs)`.
      optimizer: default AdamW at `learning_rate` (b2 = 0.99).
      Others: as in `preference_step`.

    Returns:
      The trained parameters and one metrics dict per step.
    """
    if pairs.size == 0:
        raise ValueError("train_preference: no pairs to train on")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    optimizer = optimizer or make_optimizer(learning_rate, b2=0.99)
    step_fn, shardings = make_preference_step(
        model_config, optimizer, mesh, beta=beta, objective=objective, variant=variant,
        label_smoothing=label_smoothing, average_logps=average_logps)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    state = init_train_state(copy(params), optimizer, jax.random.key(seed), with_reference=ref_params is None)
    if ref_params is not None:
        state = state._replace(ref_params=copy(ref_params))
    state = jax.device_put(state, shardings)
    P, N = widths or pair_widths(pairs)
    rows_of = epoch_batches(pairs.size, batch_size, seed)
    collected = []
    for i in range(steps):
        batch = pair_batch(pairs.take(rows_of(i)), prompt_width=P, response_width=N, rows=batch_size)
        state, metrics = step_fn(state, batch, loss_start=P)
        collected.append(metrics)
        if log_every and (i + 1) % log_every == 0:
            print(f"{objective} step {i + 1}: loss {float(metrics['loss']):.4f} "
                  f"margin {float(metrics['reward_margin']):.4f}", flush=True)
    history = [{k: float(v) for k, v in m.items()} for m in jax.device_get(collected)]
    return PreferenceResult(state.params, history)


def spin_pairs(
    prompt_ids: Sequence[Sequence[int]], gold_ids: Sequence[Sequence[int]], sample: SampleOutput, *,
    drop_identical: bool = True,
) -> tuple[EncodedPairs, int]:
    """SPIN's pairs: the gold response chosen, the model's own sample rejected.

    Sample rows are prompt-major (row i*G + j is sample j of prompt i). A sample
    equal to its gold response gives no gradient (both sides are the same
    sequence) and is dropped with `drop_identical`, as is an empty sample.

    Returns:
      The pairs and the number of samples dropped.
    """
    R = len(sample.lengths)
    if R % len(prompt_ids):
        raise ValueError(f"spin_pairs: {R} sampled rows is not a multiple of {len(prompt_ids)} prompts")
    G = R // len(prompt_ids)
    out = EncodedPairs([], [], [])
    dropped = 0
    for row in range(R):
        i = row // G
        generated = [int(t) for t in sample.tokens[row, :int(sample.lengths[row])]]
        if not generated or (drop_identical and generated == list(gold_ids[i])):
            dropped += 1
            continue
        out.prompts.append(list(prompt_ids[i]))
        out.chosen.append(list(gold_ids[i]))
        out.rejected.append(generated)
    return out, dropped


@dataclasses.dataclass
class SpinIteration:
    """One SPIN iteration: the new parameters, the pairs trained on, and the metrics."""

    params: Params
    pairs: EncodedPairs
    dropped: int
    history: list[dict[str, float]]


def spin_iteration(
    params: Params, model_config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
    gold_ids: Sequence[Sequence[int]], *, rng: jax.Array, max_new_tokens: int, steps: int, batch_size: int,
    learning_rate: float, beta: float = 0.1, stop_token_ids: Sequence[int] = (), temperature: float = 1.0,
    num_samples: int = 1, variant: str = "sigmoid", mesh: Mesh | None = None, seed: int = 0,
    prompt_len_buckets: Sequence[int] | None = DEFAULT_PROMPT_LEN_BUCKETS,
    widths: tuple[int, int] | None = None,
) -> SpinIteration:
    """M_t -> M_{t+1}: sample from `params`, pair gold (chosen) with the samples, train against M_t.

    When every sample equals its gold response there is nothing to learn (the
    model matches the data, SPIN's fixed point) and `params` come back unchanged.
    """
    sample = generate(params, model_config, [list(p) for p in prompt_ids], max_new_tokens=max_new_tokens,
                      num_samples=num_samples, temperature=temperature, stop_token_ids=tuple(stop_token_ids),
                      rng=rng, mesh=mesh, prompt_len_buckets=prompt_len_buckets)
    pairs, dropped = spin_pairs(prompt_ids, gold_ids, sample)
    if pairs.size == 0:
        return SpinIteration(params, pairs, dropped, [])
    result = train_preference(params, model_config, pairs, steps=steps, batch_size=batch_size,
                              learning_rate=learning_rate, beta=beta, objective="spin", variant=variant,
                              ref_params=params, mesh=mesh, seed=seed, widths=widths)
    return SpinIteration(result.params, pairs, dropped, result.history)


def run_spin(
    params: Params, model_config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
    gold_ids: Sequence[Sequence[int]], *, iterations: int, rng: jax.Array, **kwargs: Any,
) -> list[SpinIteration]:
    """`iterations` SPIN iterations, each starting from (and referenced to) the last one's model."""
    seed = kwargs.pop("seed", 0)
    out = []
    for t in range(iterations):
        it = spin_iteration(params, model_config, prompt_ids, gold_ids, rng=jax.random.fold_in(rng, t),
                            seed=seed + t, **kwargs)
        out.append(it)
        params = it.params
    return out
