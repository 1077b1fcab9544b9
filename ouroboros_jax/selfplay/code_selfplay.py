"""Proposer/solver self-play on the code executor: one policy makes its own tasks and learns to solve them.

One step, for each task type (deduction, abduction, induction):

1. propose: G samples per proposer prompt (the prompt shows tasks from the buffer;
   `rollout.sample`);
2. validate: each proposal runs twice in the sandbox (`code_executor.validate_proposal`);
3. solve: every new valid task, topped up from the buffer to `solve_per_type`
   tasks, gets G solver samples, and the executor checks each answer (the
   reward source `SolverReward`);
4. reward: solver = correctness; proposer = learnability of its task,
   ``1 - s`` for a solver success rate ``s`` strictly between 0 and 1, else 0
   (`invalid_proposal_reward` for a proposal that made no task);
5. advantages: normalised within each (task type, role) group, the
   "task-relative" baselines of Absolute Zero (Zhao et al. 2025, arXiv:2505.03335);
6. update: proposer and solver rows form one batch (`batch.pack_rows`) for the
   single jitted update step (`step.make_train_step`) with the configured
   GRPO-family objective.

Valid new tasks then join the buffer (deduplicated). The batch is padded to a
fixed shape (rows and width), so the update compiles once.

`run_code_selfplay` is an edge: it reads `CodeSelfPlayConfig`; the functions
it calls take explicit values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import Bool, Float

from ouroboros_jax import rollout
from ouroboros_jax.algorithms import AdvantageMode, compute_advantages
from ouroboros_jax.batch import Batch, pack_rows
from ouroboros_jax.config import ConfigError, LossConfig, ModelConfig, OptimizerConfig, SamplingConfig
from ouroboros_jax.metrics import MetricsLogger, PhaseTimer
from ouroboros_jax.models.transformer import param_specs
from ouroboros_jax.rewards import Completions, Rewards
from ouroboros_jax.rollout import RolloutSettings
from ouroboros_jax.sampling import SampleOutput, generate
from ouroboros_jax.selfplay.code_executor import CodeExecutor, ExecSettings, Validation
from ouroboros_jax.selfplay.code_tasks import (
    SEED_PROGRAMS,
    TASK_TYPES,
    CodeTask,
    TaskBuffer,
    load_seed_programs,
    proposer_prompt,
    solver_prompt,
)
from ouroboros_jax.sharding import batch_shards
from ouroboros_jax.step import TrainState, init_train_state, make_train_step
from ouroboros_jax.trainer import optimizer_from_config, policy_objective, rollout_settings

PROPOSER, SOLVER = "proposer", "solver"


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"selfplay.{name}: {rule} (got {value!r})")


@dataclasses.dataclass(frozen=True)
class CodeSelfPlayConfig:
    """The self-play loop.

    Attributes:
      steps: training steps (one update each).
      task_types: which of deduction, abduction, induction to play.
      sampling: the experiment's sampling section: `group_size` G (proposals per
        proposer prompt and solver samples per task), `max_new_tokens` (the
        solver's completion length), temperature / top-p / top-k, extra stop
        tokens, and `prompt_len_buckets` (those below `max_prompt_len`, then
        `max_prompt_len` itself). The loop does no held-out evaluation: `eval_*` are unused.
      proposer_prompts: proposer prompts per task type per step (G proposals each).
      solve_per_type: tasks solved per type per step: the new valid ones, topped up from the buffer.
      references: buffered tasks shown in each proposer prompt.
      buffer_size: tasks kept per type (seeds always stay).
      induction_visible, induction_hidden: examples an induction solver sees, and held back for the check.
      seed_inputs: tasks per seed program for deduction and abduction (one per input).
      seed_file: JSONL of extra seed programs (`code_tasks.load_seed_programs`); "": built-ins only.
      max_prompt_len: longest prompt in tokens; also the prompt width of the update batch.
      propose_max_new_tokens: the proposer's completion length (programs are longer than answers).
      exec_timeout_s, exec_memory_mb, max_program_chars, max_value_chars: sandbox limits (`ExecSettings`).
      workers: sandboxed runs in flight at once.
      invalid_proposal_reward: proposer reward of a proposal that made no task.
      micro_batch_size: rows per micro-batch of the update (0: the whole batch).
      seed: random seed of the loop (prompts, buffer draws, sampling).

    The advantage normaliser applied within each (task type, role) group is the
    loss section's `advantage` (`algorithms.compute_advantages`).
    """

    steps: int = 20
    task_types: tuple[str, ...] = TASK_TYPES
    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(group_size=4, max_new_tokens=128))
    proposer_prompts: int = 1
    solve_per_type: int = 4
    references: int = 1
    buffer_size: int = 512
    induction_visible: int = 3
    induction_hidden: int = 2
    seed_inputs: int = 2
    seed_file: str = ""
    max_prompt_len: int = 768
    propose_max_new_tokens: int = 256
    exec_timeout_s: float = 2.0
    exec_memory_mb: int = 512
    max_program_chars: int = 1200
    max_value_chars: int = 200
    workers: int = 4
    invalid_proposal_reward: float = -0.5
    micro_batch_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(len(self.task_types) > 0 and set(self.task_types) <= set(TASK_TYPES)
               and len(set(self.task_types)) == len(self.task_types), "task_types",
               f"must be distinct names from {list(TASK_TYPES)}", self.task_types)
        for name in ("steps", "proposer_prompts", "solve_per_type", "buffer_size", "induction_visible",
                     "induction_hidden", "seed_inputs", "max_prompt_len", "propose_max_new_tokens",
                     "exec_memory_mb", "max_program_chars", "max_value_chars", "workers"):
            _check(getattr(self, name) > 0, name, "must be positive", getattr(self, name))
        _check(self.references >= 0, "references", "must be >= 0", self.references)
        _check(self.exec_timeout_s > 0, "exec_timeout_s", "must be positive", self.exec_timeout_s)
        _check(self.micro_batch_size >= 0, "micro_batch_size", "must be >= 0 (0: whole batch)",
               self.micro_batch_size)

    def n_inputs(self, kind: str) -> int:
        """Inputs a proposal of this type carries."""
        return self.induction_visible + self.induction_hidden if kind == "induction" else 1

    def n_visible(self, kind: str) -> int:
        return self.induction_visible if kind == "induction" else 1

    @property
    def group_size(self) -> int:
        """G: proposals per proposer prompt, answers per task."""
        return self.sampling.group_size

    @property
    def completion_width(self) -> int:
        return max(self.propose_max_new_tokens, self.sampling.max_new_tokens)

    @property
    def max_tasks_per_type(self) -> int:
        """Tasks solved per type at most: all proposals valid and distinct, or the top-up."""
        return max(self.solve_per_type, self.proposer_prompts * self.group_size)

    @property
    def prompt_len_buckets(self) -> tuple[int, ...]:
        """The sampling section's prompt buckets below `max_prompt_len`, then `max_prompt_len`."""
        shorter = (b for b in self.sampling.prompt_len_buckets if b < self.max_prompt_len)
        return (*shorter, self.max_prompt_len)

    def exec_settings(self) -> ExecSettings:
        return ExecSettings(timeout_s=self.exec_timeout_s, memory_mb=self.exec_memory_mb,
                            max_program_chars=self.max_program_chars, max_value_chars=self.max_value_chars)


# ---------------------------------------------------------------------------
# Rewards and advantages (pure)


def learnability_reward(success_rate: Float[np.ndarray, " B"]) -> Float[np.ndarray, " B"]:
    """Proposer reward per task: ``1 - s`` when ``0 < s < 1``, else 0 (always or never solved)."""
    s = np.asarray(success_rate, np.float64)
    return np.where((s > 0) & (s < 1), 1.0 - s, 0.0)


def role_advantages(rewards: Float[np.ndarray, " R"], groups: Sequence[Hashable], *,
                    mode: AdvantageMode = "grpo") -> Float[np.ndarray, " R"]:
    """Advantages normalised separately within each group of rows (e.g. each task type of one role).

    The rows of one group form a single ``[1, n]`` group for
    `algorithms.compute_advantages`: with ``grpo``, ``(r - mean) / (std + eps)``
    over that group only.
    """
    rewards = np.asarray(rewards, np.float32)
    if len(groups) != len(rewards):
        raise ValueError(f"role_advantages: {len(rewards)} rewards but {len(groups)} group labels")
    out = np.zeros(len(rewards), np.float32)
    labels = np.asarray([str(g) for g in groups], object)
    for label in dict.fromkeys(labels):
        rows = np.flatnonzero(labels == label)
        out[rows] = np.asarray(compute_advantages(rewards[rows][None, :], mode=mode))[0]
    return out


def rows_to_batch(samples: Sequence[SampleOutput], advantages: Sequence[np.ndarray], *, prompt_width: int,
                  completion_width: int, num_rows: int) -> tuple[Batch, Bool[np.ndarray, " B"]]:
    """One update batch from several sampler outputs: prompts left-padded to ``prompt_width``,
    completions from column ``prompt_width`` on, then rows padded to ``num_rows``.

    Padding rows repeat the first row with no loss tokens and advantage 0, so
    they are finite and add nothing. Returns the batch and which rows are real.
    """
    total = sum(s.tokens.shape[0] for s in samples)
    if total > num_rows or total == 0:
        raise ValueError(f"rows_to_batch: {total} rows for a batch of {num_rows}")
    prompts, completions, logp = [], [], []
    for s in samples:
        lengths = np.asarray(s.lengths)
        prompts += [p[m] for p, m in zip(s.prompt_tokens, s.prompt_mask, strict=True)]
        completions += [t[:n] for t, n in zip(s.tokens, lengths, strict=True)]
        logp += [lp[:n] for lp, n in zip(s.policy_logprobs, lengths, strict=True)]
    pad = num_rows - total
    adv = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in advantages] + [np.zeros(pad)])
    batch = pack_rows(prompts + prompts[:1] * pad, completions + completions[:1] * pad,
                      completion_logp=logp + logp[:1] * pad, advantages=adv,
                      loss_rows=np.arange(num_rows) < total, prompt_width=prompt_width,
                      completion_width=completion_width)
    return batch, np.arange(num_rows) < total


# ---------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class SelfPlayRuntime:
    """What one step needs besides the train state (built by `make_runtime`).

    ``generate_fn`` has the signature of `sampling.generate`; tests pass one that
    returns chosen texts.
    """

    cfg: CodeSelfPlayConfig
    model_config: ModelConfig
    step_fn: Callable
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    propose: RolloutSettings
    solve: RolloutSettings
    advantage: AdvantageMode
    executor: CodeExecutor
    buffer: TaskBuffer
    batch_rows: int
    mesh: Any = None
    generate_fn: Callable[..., SampleOutput] = generate


@dataclasses.dataclass
class StepRecord:
    """Everything one step decided, for inspection and tests.

    Proposer arrays have one entry per proposal (``proposal_task[i]`` indexes
    ``tasks``, -1 for an invalid proposal); solver arrays one per solver sample,
    task-major (sample j of task t is row ``t * G + j``).
    """

    proposal_kinds: list[str]
    proposal_texts: list[str]
    validations: list[Validation]
    proposal_task: np.ndarray
    tasks: list[CodeTask]
    solver_texts: list[str]
    solver_correct: np.ndarray
    success_rate: np.ndarray
    proposer_rewards: np.ndarray
    solver_rewards: np.ndarray
    proposer_advantages: np.ndarray
    solver_advantages: np.ndarray
    added: list[CodeTask]


def _proposer_ids(rt: SelfPlayRuntime, kind: str, rng: np.random.Generator) -> list[int]:
    """The proposer prompt, dropping references until it fits in max_prompt_len."""
    refs = rt.buffer.sample(kind, rt.cfg.references, rng)
    while True:
        ids = rt.encode(proposer_prompt(kind, refs, rt.cfg.n_inputs(kind)))
        if len(ids) <= rt.cfg.max_prompt_len:
            return ids
        if not refs:
            raise ConfigError(f"selfplay.max_prompt_len: the {kind} proposer prompt has {len(ids)} tokens "
                              f"even without references (got {rt.cfg.max_prompt_len})")
        refs = refs[:-1]


def _fits(rt: SelfPlayRuntime, task: CodeTask) -> bool:
    return len(rt.encode(solver_prompt(task))) <= rt.cfg.max_prompt_len


def seed_buffer(rt: SelfPlayRuntime, seeds: Sequence[tuple[str, Sequence[str]]]) -> int:
    """Validate the seed programs in the sandbox and add their tasks; returns how many went in.

    Deduction and abduction get one task per input (the first `seed_inputs`),
    induction one task per program with all its inputs. Raises ConfigError when
    a task type ends up with no seed task (e.g. prompts longer than max_prompt_len).
    """
    cfg, added = rt.cfg, 0
    for kind in cfg.task_types:
        n = cfg.n_inputs(kind)
        if kind == "induction":
            jobs = [(p, tuple(i[:n])) for p, i in seeds if len(i) >= n]
        else:
            jobs = [(p, (i,)) for p, inputs in seeds for i in inputs[:cfg.seed_inputs]]
        made = rt.executor.make_tasks(kind, jobs, n_visible=cfg.n_visible(kind))
        for job, v in zip(jobs, made, strict=True):
            if not v.valid:
                raise ConfigError(f"seed program is not a valid {kind} task ({v.reason}):\n{job[0]}")
            if _fits(rt, v.task):
                added += rt.buffer.add(v.task)
        if not rt.buffer.tasks(kind):
            raise ConfigError(f"selfplay.max_prompt_len: no {kind} seed task fits in "
                              f"{cfg.max_prompt_len} prompt tokens (or no seed has {n} inputs)")
    return added


def _tasks_to_solve(rt: SelfPlayRuntime, validations: list[Validation], rng: np.random.Generator):
    """New valid tasks (deduplicated within the step), then buffered ones up to solve_per_type per type."""
    tasks: list[CodeTask] = []
    index: dict[tuple, int] = {}
    proposal_task = np.full(len(validations), -1, np.int64)
    for i, v in enumerate(validations):
        if v.task is None:
            continue
        key = v.task.key
        if key not in index:
            index[key] = len(tasks)
            tasks.append(v.task)
        proposal_task[i] = index[key]
    new = list(tasks)
    for kind in rt.cfg.task_types:
        have = sum(t.kind == kind for t in new)
        tasks += rt.buffer.sample(kind, rt.cfg.solve_per_type - have, rng, exclude=list(index))
    return tasks, new, proposal_task


@dataclasses.dataclass
class SolverReward:
    """The executor's check of each solver answer against its task, as a reward source.

    The completions' examples are the tasks (one per solver prompt); the
    reward is the check's score and `correct` its judgement.
    """

    executor: CodeExecutor

    def __call__(self, completions: Completions) -> Rewards:
        pairs = list(zip(completions.row_examples(), completions.texts or (), strict=True))
        verdicts = self.executor.check_many(pairs)
        return Rewards(np.array([float(v.score) for v in verdicts], np.float64),
                       np.array([bool(v.correct) for v in verdicts]), list(verdicts))


def selfplay_step(state: TrainState, rt: SelfPlayRuntime, step: int
                  ) -> tuple[TrainState, dict[str, float], StepRecord]:
    """Propose, validate, solve, verify, reward, and one update; see the module docstring."""
    cfg, G = rt.cfg, rt.cfg.group_size
    rng = np.random.default_rng([cfg.seed, step])
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    timer = PhaseTimer()
    sample = functools.partial(rollout.sample, state.params, rt.model_config, decode=rt.decode, mesh=rt.mesh,
                               generate_fn=rt.generate_fn)
    kinds = [k for k in cfg.task_types for _ in range(cfg.proposer_prompts)]
    with timer.phase("propose"):
        prop_out, prop_texts = sample([_proposer_ids(rt, k, rng) for k in kinds], settings=rt.propose,
                                      rng=jax.random.fold_in(key, 0))
    prop_kinds = [k for k in kinds for _ in range(G)]
    with timer.phase("validate"):
        validations = rt.executor.validate_many(
            list(zip(prop_kinds, prop_texts, strict=True)),
            n_inputs={k: cfg.n_inputs(k) for k in cfg.task_types},
            n_visible={k: cfg.n_visible(k) for k in cfg.task_types})
        validations = [v if v.task is None or _fits(rt, v.task)
                       else Validation(None, "solver prompt longer than max_prompt_len") for v in validations]
        tasks, new, proposal_task = _tasks_to_solve(rt, validations, rng)
    with timer.phase("solve"):
        sol_out, sol_texts = sample([rt.encode(solver_prompt(t)) for t in tasks], settings=rt.solve,
                                    rng=jax.random.fold_in(key, 1))
    with timer.phase("check"):
        solved = SolverReward(rt.executor)(Completions(sol_out, sol_texts, tasks))
    solver_rewards, correct = solved.rewards, solved.correct
    success = correct.reshape(len(tasks), G).mean(axis=1)
    learn = learnability_reward(success)
    proposer_rewards = np.where(proposal_task >= 0, learn[np.maximum(proposal_task, 0)],
                                cfg.invalid_proposal_reward)
    adv_p = role_advantages(proposer_rewards, [(k, PROPOSER) for k in prop_kinds], mode=rt.advantage)
    sol_kinds = [t.kind for t in tasks for _ in range(G)]
    adv_s = role_advantages(solver_rewards, [(k, SOLVER) for k in sol_kinds], mode=rt.advantage)
    added = [t for t in new if rt.buffer.add(t)]
    with timer.phase("update"):
        batch, _ = rows_to_batch([prop_out, sol_out], [adv_p, adv_s], prompt_width=cfg.max_prompt_len,
                                 completion_width=cfg.completion_width, num_rows=rt.batch_rows)
        state, train_metrics = rt.step_fn(state, batch)
        train_metrics = jax.device_get(train_metrics)
    record = StepRecord(prop_kinds, prop_texts, validations, proposal_task, tasks, sol_texts, correct,
                        success, proposer_rewards, solver_rewards, adv_p, adv_s, added)
    metrics = {f"train/{k}": float(v) for k, v in train_metrics.items()}
    metrics |= _step_metrics(rt, record) | timer.lap()
    return state, metrics, record


def _step_metrics(rt: SelfPlayRuntime, r: StepRecord) -> dict[str, float]:
    G = rt.cfg.group_size
    out: dict[str, float] = {}
    prop_kinds = np.asarray(r.proposal_kinds)
    task_kinds = np.asarray([t.kind for t in r.tasks])
    for kind in rt.cfg.task_types:
        p = prop_kinds == kind
        t = task_kinds == kind
        solved = r.solver_correct.reshape(len(r.tasks), G)[t]
        out[f"propose/{kind}/valid_frac"] = float((r.proposal_task[p] >= 0).mean())
        out[f"propose/{kind}/reward"] = float(r.proposer_rewards[p].mean())
        out[f"propose/{kind}/added"] = float(sum(a.kind == kind for a in r.added))
        out[f"solve/{kind}/accuracy"] = float(solved.mean()) if solved.size else 0.0
        out[f"solve/{kind}/tasks"] = float(t.sum())
        out[f"buffer/{kind}"] = float(len(rt.buffer.tasks(kind)))
    out["propose/valid_frac"] = float((r.proposal_task >= 0).mean())
    out["solve/accuracy"] = float(r.solver_correct.mean())
    return out


def make_runtime(
    cfg: CodeSelfPlayConfig, *, model_config: ModelConfig, params: Any, loss: LossConfig,
    optimizer: OptimizerConfig, encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
    stop_token_ids: Sequence[int], mesh: Any, executor: CodeExecutor | None = None,
    generate_fn: Callable[..., SampleOutput] = generate,
) -> tuple[SelfPlayRuntime, TrainState]:
    """The compiled update step, the initial state, the executor and the seeded buffer (an edge)."""
    width = cfg.max_prompt_len + cfg.completion_width
    if width > model_config.max_seq_len:
        raise ConfigError(f"selfplay.max_prompt_len: max_prompt_len + the longest completion = {width} "
                          f"exceeds model.max_seq_len={model_config.max_seq_len}")
    shards = batch_shards(mesh)
    rows = len(cfg.task_types) * cfg.group_size * (cfg.proposer_prompts + cfg.max_tasks_per_type)
    # Rows come in whole micro-batches, each spread evenly over the batch shards.
    step_rows = math.lcm(cfg.micro_batch_size, shards) if cfg.micro_batch_size else shards
    batch_rows = -(-rows // step_rows) * step_rows
    opt = optimizer_from_config(optimizer, total_steps=cfg.steps)
    objective = policy_objective(model_config, loss, max_completion_len=cfg.completion_width,
                                 temperature=cfg.sampling.temperature or 1.0)
    step_fn, shardings = make_train_step(objective, opt, mesh, param_specs(model_config),
                                         micro_batch_size=cfg.micro_batch_size)
    state = init_train_state(params, opt, jax.random.key(cfg.seed), with_reference=objective.uses_reference,
                             shardings=shardings)
    executor = executor or CodeExecutor(cfg.exec_settings(), workers=cfg.workers)
    stops = tuple(sorted({*cfg.sampling.stop_token_ids, *stop_token_ids}))
    solve = rollout_settings(cfg.sampling, stop_token_ids=stops, prompt_len_buckets=cfg.prompt_len_buckets)
    propose = dataclasses.replace(solve, max_new_tokens=cfg.propose_max_new_tokens)
    rt = SelfPlayRuntime(cfg, model_config, step_fn, encode, decode, propose, solve, loss.advantage, executor,
                         TaskBuffer(cfg.buffer_size), batch_rows, mesh, generate_fn)
    seeds = SEED_PROGRAMS + (load_seed_programs(cfg.seed_file) if cfg.seed_file else ())
    seed_buffer(rt, seeds)
    return rt, state


@dataclasses.dataclass
class SelfPlayResult:
    state: TrainState
    history: list[dict[str, float]]
    buffer: TaskBuffer


def run_code_selfplay(
    cfg: CodeSelfPlayConfig, *, model_config: ModelConfig, params: Any, loss: LossConfig,
    optimizer: OptimizerConfig, encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
    stop_token_ids: Sequence[int], mesh: Any, logger: MetricsLogger | None = None,
    generate_fn: Callable[..., SampleOutput] = generate,
) -> SelfPlayResult:
    """Run ``cfg.steps`` self-play steps from ``params``.

    Args:
      cfg: the loop (read here, at the edge).
      model_config, params: the policy.
      loss, optimizer: the GRPO-family loss and the optimizer of the update step.
      encode: prompt text -> token ids (apply the chat template here).
      decode: completion ids -> text.
      stop_token_ids: tokens that end a completion.
      mesh: the device mesh of the update step and the sampler.
      logger: metric writers (None: no logging).
      generate_fn: the sampler (default `sampling.generate`).

    Returns:
      The final state, per-step metrics, and the task buffer.

    Raises:
      FloatingPointError: an update had a non-finite loss or gradient (it was skipped).
    """
    rt, state = make_runtime(cfg, model_config=model_config, params=params, loss=loss, optimizer=optimizer,
                             encode=encode, decode=decode, stop_token_ids=stop_token_ids, mesh=mesh,
                             generate_fn=generate_fn)
    history: list[dict[str, float]] = []
    try:
        for step in range(cfg.steps):
            state, metrics, _ = selfplay_step(state, rt, step)
            history.append(metrics)
            if logger is not None:
                logger.log(step + 1, metrics)
            if metrics["train/finite"] < 1:
                raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient "
                                         f"(loss={metrics['train/loss']}); the update was skipped")
    finally:
        rt.executor.close()
    return SelfPlayResult(state, history, rt.buffer)
