"""Offline preference learning: pairs from JSONL, DPO / IPO with a frozen reference, SPIN.

Preference data are (prompt, chosen, rejected) triples. Encoded
(`batch.EncodedPairs`), they become a `batch.PairBatch` (`batch.pack_pairs`):
for each pair a chosen and a rejected row in the sampler's layout (prompt
left-padded to P, response from column P), so the output head runs on the
response positions only.

The one update step (`step.make_train_step`) trains the policy on batches of
pairs with `objectives.preference`: summed response log-probs under the policy
and under the frozen reference parameters held in the state, then DPO / IPO
(`kind="dpo"`) or SPIN (`kind="spin"`).

SPIN (Chen et al. 2024, arXiv 2401.01335) runs iterations: the current model
M_t samples a response per prompt, each pair takes the gold response as chosen
and M_t's sample as rejected, and M_{t+1} is trained from M_t with M_t as the
reference (the "opponent").

Dimension legend (docs/dimensions.md): B pairs, G samples per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ouroboros_jax.algorithms import DPOVariant
from ouroboros_jax.batch import EncodedPairs, pack_pairs, pair_widths
from ouroboros_jax.config import MeshConfig, ModelConfig
from ouroboros_jax.data import DataError
from ouroboros_jax.models.transformer import Params, param_specs
from ouroboros_jax.objectives import PreferenceKind, preference
from ouroboros_jax.sampling import DEFAULT_PROMPT_LEN_BUCKETS, SampleOutput, generate
from ouroboros_jax.sharding import make_mesh
from ouroboros_jax.step import init_train_state, make_optimizer, make_train_step

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


def encode_pairs(
    pairs: Sequence[PreferencePair], encode_prompt: Callable[[str], list[int]],
    encode_response: Callable[[str], list[int]],
) -> EncodedPairs:
    """Token ids of every pair (`encode_response` should end a response with EOS)."""
    return EncodedPairs([list(encode_prompt(p.prompt)) for p in pairs],
                        [list(encode_response(p.chosen)) for p in pairs],
                        [list(encode_response(p.rejected)) for p in pairs])


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
# Training loops


@dataclasses.dataclass
class PreferenceResult:
    params: Params
    history: list[dict[str, float]]


def train_preference(
    params: Params, model_config: ModelConfig, pairs: EncodedPairs, *, steps: int, batch_size: int,
    learning_rate: float, beta: float, objective: PreferenceKind = "dpo", variant: DPOVariant = "sigmoid",
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
      objective: "dpo" or "spin" (`objectives.preference`'s `kind`).
      Others: as in `objectives.preference`.

    Returns:
      The trained parameters and one metrics dict per step.
    """
    if pairs.size == 0:
        raise ValueError("train_preference: no pairs to train on")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig())
    optimizer = optimizer or make_optimizer(learning_rate, b2=0.99)
    loss = preference(model_config, beta=beta, kind=objective, variant=variant,
                      label_smoothing=label_smoothing, average_logps=average_logps)
    step_fn, shardings = make_train_step(loss, optimizer, mesh, param_specs(model_config))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    state = init_train_state(copy(params), optimizer, jax.random.key(seed), with_reference=ref_params is None)
    if ref_params is not None:
        state = state._replace(ref_params=copy(ref_params))
    state = jax.device_put(state, shardings)
    P, C = widths or pair_widths(pairs)
    rows_of = epoch_batches(pairs.size, batch_size, seed)
    collected = []
    for i in range(steps):
        batch = pack_pairs(pairs.take(rows_of(i)), prompt_width=P, completion_width=C, num_rows=batch_size)
        state, metrics = step_fn(state, batch)
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
