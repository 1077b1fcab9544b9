"""The RL loop: data -> rollout -> reward source -> objective -> update step -> eval -> checkpoint -> logs.

One flat function, `train`, reads the experiment config (this is an edge) and
drives the pieces that take explicit values: the sampler (`rollout`), the
reward sources (`rewards`: the verifier pool, and a reward model when the task
has one), the policy-gradient objective (`objectives`), the single jitted
update step (`step`), the checkpointer and the metric writers. The config
adapters below (`optimizer_from_config`, `policy_loss_settings`,
`policy_objective`, `rollout_settings`) are what the other loops (self-play)
use to turn config into those explicit values.

Exact resume: every random draw of step t comes from `fold_in(key(seed), t)`,
and a checkpoint holds the train state and the data position, so a run of 2k
steps equals a run of k steps resumed for k more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental.compilation_cache.compilation_cache import reset_cache, set_cache_dir

from ouroboros_jax import checkpoint as ckpt
from ouroboros_jax import multihost, paths
from ouroboros_jax.batch import Batch
from ouroboros_jax.config import (
    ConfigError,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    SamplingConfig,
    VerifierConfig,
    from_dict,
    overlong_buffer,
    to_dict,
)
from ouroboros_jax.evaluation import evaluate
from ouroboros_jax.metrics import METRICS_FILE, MetricsLogger, PhaseTimer
from ouroboros_jax.models.logprobs import DEFAULT_CHUNK
from ouroboros_jax.models.transformer import Params, param_specs
from ouroboros_jax.objectives import Objective, policy_gradient
from ouroboros_jax.plots import WARMSTART_DIR
from ouroboros_jax.rewards import RewardSource, VerifierReward, WeightedRewards
from ouroboros_jax.rollout import Rollout, RolloutSettings, collect, rollout_metrics
from ouroboros_jax.sharding import batch_shards, make_mesh
from ouroboros_jax.step import TrainState, init_train_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)


def use_compilation_cache(directory: str) -> Path | None:
    """Point XLA's persistent compilation cache at `directory` ("~" expanded; "" changes nothing).

    Later runs that compile the same programs (same shapes, config and JAX
    version) load them from disk instead of compiling: on 2 CPU cores the
    quickstart's sampler and update take ~40 s to compile. Returns the directory.
    """
    if not directory:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"compilation_cache_dir: cannot create {str(path)!r}: {e}") from e
    if jax.config.jax_compilation_cache_dir != str(path):
        set_cache_dir(str(path))
        reset_cache()  # a cache opened at another directory would otherwise stay in use
    return path


class TrainingDiverged(FloatingPointError):
    """The update produced NaN or inf; it was not applied, and the message names the newest
    checkpoint on disk (only finite state is ever saved)."""


@dataclasses.dataclass
class Task:
    """What the loop needs beyond the config: data, tokenisation and the verifier.

    Attributes:
      train_source: a resumable prompt source (`ouroboros_jax.data.PromptSource`).
      encode: examples -> prompt token-id lists (templates applied).
      decode: completion token ids -> text for the verifier.
      verifier: a verifier spec for the worker pool: a registered name, a
        picklable callable, or {name_or_callable: weight}.
      stop_token_ids: tokens that end a completion (e.g. the EOS id).
      eval_examples: held-out examples (None: no evaluation).
      reward_model: optional reward source beside the verifier (`rewards.RewardSource`,
        e.g. `rewards.ModelReward`, `rewards.PARReward`), added to the verifier score.
      reward_model_weight: its weight in the reward.
      verifier_weight: the verifier score's weight; 0 with a reward model trains
        on the model's reward alone, while `accuracy` still reports the verifier.
        The sources' own metrics (`ModelReward`: ensemble mean and disagreement;
        `PARReward`: raw and reference rewards) are logged with each step's
        metrics, as the values of the step's last rollout call, and each
        source's wall time as `time/verify` and `time/reward_model`.
      encode_completion: a demonstration's completion text -> token ids, ending
        with the end-of-completion token as sampled completions do; PPO-ptx
        (`ppo.ptx_data`) needs it, with `encode` rendering the prompts.
    """

    train_source: Any
    encode: Callable[[Sequence[Any]], list[list[int]]]
    decode: Callable[[Sequence[int]], str]
    verifier: Any
    stop_token_ids: tuple[int, ...]
    eval_examples: Sequence[Any] | None = None
    reward_model: RewardSource | None = None
    reward_model_weight: float = 1.0
    verifier_weight: float = 1.0
    encode_completion: Callable[[str], list[int]] | None = None


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    run_dir: str  # a string: a URL (gs://bucket/run) stays one (see `paths`)
    resumed_from: int = 0  # the checkpoint step this run resumed from (0: a fresh start)


# ---------------------------------------------------------------------------
# Config adapters: the edge where config values become the explicit settings of the pieces


def optimizer_from_config(
    cfg: OptimizerConfig, total_steps: int | None = None
) -> optax.GradientTransformation:
    """`step.make_optimizer` with the values of an OptimizerConfig."""
    return make_optimizer(
        cfg.learning_rate, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, total_steps=total_steps,
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
    )


def policy_loss_settings(
    loss: LossConfig, *, max_completion_len: int, temperature: float = 1.0
) -> dict[str, Any]:
    """The keyword arguments of `objectives.policy_gradient` from a LossConfig.

    Args:
      loss: the loss section of the experiment config.
      max_completion_len: Dr. GRPO's constant normaliser when `loss.max_len` is unset.
      temperature: the sampling temperature (log-probs are of the tempered policy).
    """
    return dict(
        variant=loss.variant, clip_low=loss.clip_low, clip_high=loss.clip_high, aggregation=loss.aggregation,
        dual_clip=loss.dual_clip, max_len=loss.max_len or max_completion_len, kl_coef=loss.kl_coef,
        kl_kind=loss.kl_kind, entropy_coef=loss.entropy_coef, temperature=temperature,
        importance_level=loss.importance_level, importance_upper=loss.importance_upper,
        importance_lower=loss.importance_lower)


def policy_objective(
    model_config: ModelConfig, loss: LossConfig, *, max_completion_len: int, temperature: float = 1.0,
    logprob_chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """`objectives.policy_gradient` of `model_config` with the settings of a LossConfig
    (`policy_loss_settings`); `logprob_chunk` is the positions per chunk of the output projection."""
    settings = policy_loss_settings(loss, max_completion_len=max_completion_len, temperature=temperature)
    return policy_gradient(model_config, logprob_chunk=logprob_chunk, **settings)


def rollout_settings(
    sampling: SamplingConfig, loss: LossConfig | None = None, **overrides: Any
) -> RolloutSettings:
    """The rollout's explicit settings from a sampling (and loss) section; `overrides` replace fields
    (e.g. `max_new_tokens=` for a loop with several completion lengths)."""
    s = sampling
    settings = RolloutSettings(
        group_size=s.group_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        top_k=s.top_k, stop_token_ids=tuple(s.stop_token_ids), prompt_len_buckets=tuple(s.prompt_len_buckets))
    if loss is not None:
        settings = dataclasses.replace(
            settings, advantage=loss.advantage, overlong=loss.overlong,
            overlong_buffer=overlong_buffer(loss, s.max_new_tokens), overlong_penalty=loss.overlong_penalty)
    return dataclasses.replace(settings, **overrides)


def _minibatches(batch: Batch, size: int, rng: np.random.Generator) -> list[Batch]:
    """The rollout batch shuffled and cut into mini-batches of `size` rows (on the devices when the
    batch is a global array of several processes, `multihost.ProcessRollout.to_batch`)."""
    order = rng.permutation(batch.tokens.shape[0])
    if isinstance(batch.tokens, jax.Array) and not batch.tokens.is_fully_addressable:
        return [multihost.take_rows(batch, order[start:start + size]) for start in range(0, len(order), size)]
    return [jax.tree.map(lambda a, rows=order[start:start + size]: np.asarray(a)[rows], batch)
            for start in range(0, len(order), size)]


def _update(step_fn, state: TrainState, rollout: Rollout, cfg: ExperimentConfig, step: int):
    """`inner_epochs` passes over the rollout in mini-batches; metrics averaged over updates."""
    # Completion tokens start at the prompt bucket's width (`loss_start`): the output head skips the prompt.
    batch = rollout.to_batch()
    rng = np.random.default_rng([cfg.seed, step])
    collected = []
    for _ in range(cfg.train.inner_epochs):
        for mb in _minibatches(batch, cfg.train.mini_batch_size, rng):
            state, metrics = step_fn(state, mb)
            collected.append(metrics)
    host = jax.device_get(collected)  # one transfer for every update of this step
    keys = host[0].keys()
    out = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in keys}
    out["train/finite"] = float(min(m["finite"] for m in host))
    mask = batch.attention_mask
    tokens = int(np.asarray(mask).sum() if not isinstance(mask, jax.Array) else jax.numpy.sum(mask))
    return state, out, tokens


def train(
    cfg: ExperimentConfig, *, model_config: ModelConfig, params: Params, task: Task,
    mesh: Any = None, logger: MetricsLogger | None = None,
) -> TrainResult:
    """Run the RL loop of `cfg` from `params` (or resume from the run's checkpoints).

    Args:
      cfg: the experiment (read here, at the edge).
      model_config: the architecture of `params` (e.g. from `load_hf_checkpoint`).
      params: the initial policy (also the reference when `loss.kl_coef` > 0).
      task: data, tokenisation and verifier (see `Task`).
      mesh: the device mesh; default: built from `cfg.mesh`.
      logger: metric writers; default: built from `cfg.logging` (a logger passed in should be
        built after `prepare_run_dir`, which may clear the run directory).

    Returns:
      The final state, per-step metrics, evaluations (the first is always the step-0
      evaluation, read back from the run directory after a resume) and the run directory.

    Raises:
      ConfigError: the run directory holds a run of another config (see `prepare_run_dir`).
      TrainingDiverged: a non-finite loss, gradient or new state; the update was not
        applied, and the message names the newest (finite) checkpoint on disk.
    """
    from verifiers import VerifierPool

    use_compilation_cache(cfg.compilation_cache_dir)
    run_dir = paths.check(cfg.logging.run_dir)
    prepare_run_dir(cfg)
    rl_step = _rl_step
    if cfg.disagg.sampler_devices:  # the sampler on devices of its own (ouroboros_jax.disaggregated)
        from ouroboros_jax.disaggregated import DisaggregatedStep
        rl_step = DisaggregatedStep(cfg, model_config, mesh, update=_update)
        mesh = rl_step.train_mesh  # the update, the evaluation and the checkpoints live here
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    check_batch_fits_mesh(cfg, mesh)
    from ouroboros_jax import ppo  # PPO with a critic: its own step compilation and update phase
    if cfg.ppo.enabled:  # the task's demonstrations feed PPO-ptx
        step_fn, state = ppo.compile_ppo(cfg, model_config, params, mesh, task=task)
    else:
        step_fn, state = _compile_step(cfg, model_config, params, mesh)
    checkpointer = ckpt.Checkpointer.from_config(cfg.checkpoint, checkpoint_directory(cfg))
    start, rl_seconds = 0, 0.0
    if checkpointer is not None and cfg.checkpoint.resume:
        restored = checkpointer.restore_latest(ckpt.abstract_state(state))
        if restored is not None:
            for line in restored.rejected:
                _say(f"{cfg.name}: rejected checkpoint {line}")
            state, start = restored.state, int(restored.metadata["step"])
            task.train_source.seek(int(restored.metadata["data_position"]))
            rl_seconds = float(restored.metadata.get("rl_seconds", 0.0))
            _say(f"{cfg.name}: resuming from step {start} of {run_dir}")
    logger = logger or MetricsLogger.from_config(cfg.logging)
    logger.truncate_after(start if start else -1)  # steps after the checkpoint run again: one record each
    stops = tuple(sorted({*cfg.sampling.stop_token_ids, *task.stop_token_ids}))
    settings = rollout_settings(cfg.sampling, cfg.loss, stop_token_ids=stops)
    result = TrainResult(state, [], [], run_dir, resumed_from=start)
    pool = VerifierPool(task.verifier, workers=cfg.verifier.num_workers, timeout_s=cfg.verifier.timeout_s)
    timer = PhaseTimer()
    terms = {"verify": (VerifierReward(pool.score), task.verifier_weight)}
    if task.reward_model is not None:
        terms["reward_model"] = (task.reward_model, task.reward_model_weight)
    reward = WeightedRewards(terms, timer=timer)
    try:
        run_eval = _evaluator(cfg, model_config, task, pool, mesh, stops)
        if task.eval_examples and cfg.train.eval_every:
            baseline = _baseline_eval(run_dir) if start else None
            if baseline is None and start == 0:
                baseline = run_eval(state.params, 0)
                logger.log(0, baseline)
                _write_json(paths.join(run_dir, BASELINE_FILE), baseline)
            if baseline is not None:
                result.evals.append(baseline)
        for step in range(start, cfg.train.steps):
            state, metrics = rl_step(cfg, model_config, step_fn, state, task, settings, reward, timer, mesh,
                                     step)
            result.history.append(metrics)
            done = step + 1
            if metrics["train/finite"] < 1:
                logger.log(done, metrics)
                raise TrainingDiverged(_diverged_message(done, metrics, checkpointer))
            rl_seconds += metrics["time/step"]
            metrics["time/rl_total"] = rl_seconds
            out_of_time = bool(cfg.train.time_limit_s) and rl_seconds >= cfg.train.time_limit_s
            last = done == cfg.train.steps or out_of_time
            if cfg.train.ref_update_every and done % cfg.train.ref_update_every == 0:
                state = _refresh_reference(state)
            if task.eval_examples and cfg.train.eval_every and (done % cfg.train.eval_every == 0 or last):
                result.evals.append(run_eval(state.params, done))
                metrics |= result.evals[-1]
            if done % cfg.logging.log_every == 0 or last:
                logger.log(done, metrics)
            every = cfg.checkpoint.save_every
            if checkpointer is not None and ((every and done % every == 0) or last):
                meta = {"step": done, "data_position": task.train_source.position, "rl_seconds": rl_seconds}
                checkpointer.save(done, state, meta, metrics=metrics)
            if out_of_time:
                _say(f"{cfg.name}: train.time_limit_s={cfg.train.time_limit_s:g} reached after step {done} "
                     f"({rl_seconds:.0f} s of RL steps)")
                break
    finally:
        if rl_step is not _rl_step:
            rl_step.close()  # the background rollout first: it may be using the pool
        pool.close()
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()
        logger.close()
    result.state = state
    return result


def _diverged_message(done: int, metrics: dict[str, float], checkpointer: ckpt.Checkpointer | None) -> str:
    """What a non-finite update says: its loss and gradient norm, and the checkpoint to go back to."""
    head = (f"step {done}: the update is not finite (loss={metrics['train/loss']}, "
            f"grad_norm={metrics['train/grad_norm']}, or NaN/inf in the new parameters or optimizer "
            "state); it was not applied")
    if checkpointer is None:
        return head + "; no checkpoints are written (set checkpoint.save_every or checkpoint.directory)"
    checkpointer.wait()
    latest = checkpointer.latest_step()
    if latest is None:
        return head + f"; no checkpoint was saved yet in {checkpointer.directory}"
    return (head + f"; the last good checkpoint is step {latest} in {checkpointer.directory} "
            "(only finite state is saved): lower optimizer.learning_rate, or check the rewards, and resume")


def _say(line: str) -> None:
    """A line for the console and the log: what the run did that the user did not ask for by name."""
    print(line, flush=True)
    log.info(line)


# ---------------------------------------------------------------------------
# The run directory: one run per directory, refused when the config changed


CONFIG_FILE = "config.json"
BASELINE_FILE = "eval_step0.json"  # the step-0 evaluation, read back by a resumed run's summary
# Fields that may differ between a run directory's saved config and the one resuming it: they
# change how a run is watched or paced, never what it computes.
RESUMABLE_FIELDS = frozenset({
    "logging.console", "logging.tensorboard", "logging.jsonl", "logging.log_every", "logging.overwrite",
    "verifier.num_workers", "checkpoint.async_save", "compilation_cache_dir", "export_dir",
    "train.time_limit_s",  # a resumed run may be given more (or less) time
})


def checkpoint_directory(cfg: ExperimentConfig) -> str:
    """Where the run's checkpoints go: `checkpoint.directory`, else RUN_DIR/checkpoints when
    `checkpoint.save_every` is set, else "" (none). URLs stay URLs (`paths.join`)."""
    if cfg.checkpoint.directory:
        return paths.check(cfg.checkpoint.directory)
    if cfg.checkpoint.save_every:
        return paths.join(cfg.logging.run_dir, "checkpoints")
    return ""


def config_diff(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """The fields that differ, as "field: old -> new" lines (RESUMABLE_FIELDS left out)."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
        return out

    a, b = flat(to_dict(old)), flat(to_dict(new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)]


_CLEARED: set[tuple[str, ExperimentConfig]] = set()


def prepare_run_dir(cfg: ExperimentConfig) -> int:
    """Make the run directory ready for `cfg`, before anything is computed; returns the step a
    resume will start from (the newest checkpoint, 0 for a fresh run).

    A directory that holds the config of another run (another seed, preset, step count...)
    is refused with the fields that differ, unless `logging.overwrite` (`--overwrite`) is set:
    then that run's config, metrics, plots, events and checkpoints are deleted first (once per
    process and config: `train` calling it again keeps what the script wrote meanwhile). Scripts
    call this before their own work (a warm-start) so that a resume can skip that work.

    Raises:
      ConfigError: the directory holds another run's config (the diff is in the message).
    """
    run_dir = paths.check(cfg.logging.run_dir)
    root = paths.as_path(run_dir)
    saved = root / CONFIG_FILE
    ckpt_dir = checkpoint_directory(cfg)
    # With several processes (hosts), every one checks the directory but only process 0 changes it.
    writer = jax.process_index() == 0
    if cfg.logging.overwrite and (run_dir, cfg) not in _CLEARED:
        if writer:
            _clear_run(root, ckpt_dir)
        _CLEARED.add((run_dir, cfg))  # once per process: train() after a script's own call keeps its work
    elif saved.exists():
        try:
            old = from_dict(ExperimentConfig, json.loads(saved.read_text()))
        except (ConfigError, json.JSONDecodeError) as err:
            raise ConfigError(f"{saved}: the run directory's config does not load ({err}); pass --overwrite "
                              "to start this run over, or choose another --logging.run_dir") from err
        diff = config_diff(old, cfg)
        if diff:
            raise ConfigError(
                f"logging.run_dir: {run_dir} holds a run with another config; changed fields:\n  "
                + "\n  ".join(diff)
                + "\npass --overwrite to delete that run and start over, or --logging.run_dir NEW_DIR "
                  "for a fresh directory (resuming needs the same config)")
    if writer:
        root.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    if not ckpt_dir or not cfg.checkpoint.resume or not paths.as_path(ckpt_dir).exists():
        return 0
    return max((int(p.name) for p in paths.as_path(ckpt_dir).iterdir() if p.name.isdigit()), default=0)


def _clear_run(root: Any, ckpt_dir: str) -> None:
    if ckpt_dir and paths.as_path(ckpt_dir).exists():
        paths.as_path(ckpt_dir).rmtree()
    if not root.exists():
        return
    for p in root.iterdir():
        if p.name == WARMSTART_DIR and p.is_dir():
            p.rmtree()
        elif (p.name in (CONFIG_FILE, BASELINE_FILE, METRICS_FILE) or p.name.endswith(".png")
              or p.name.startswith("events.out.tfevents")):
            p.unlink()


def _baseline_eval(run_dir: str) -> dict[str, float] | None:
    path = paths.as_path(paths.join(run_dir, BASELINE_FILE))
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: str, value: dict[str, float]) -> None:
    paths.as_path(path).write_text(json.dumps({k: float(v) for k, v in value.items()}, indent=2) + "\n")


def verifier_spec(cfg: VerifierConfig) -> str | dict[str, float]:
    """The verifier spec of a VerifierConfig, the same in every script: the one name when it is
    alone with weight 1, else `{name: weight}` for the weighted sum of every named verifier
    (`verifiers.combine`; the first is the one `accuracy` reports)."""
    if len(cfg.names) == 1 and cfg.weights[0] == 1.0:
        return cfg.names[0]
    return dict(zip(cfg.names, cfg.weights, strict=True))


def check_batch_fits_mesh(cfg: ExperimentConfig, mesh: Any) -> None:
    """Reject, before any compile, batch sizes that the mesh's batch shards do not divide."""
    shards = batch_shards(mesh)
    for name in ("mini_batch_size", "micro_batch_size"):
        size = getattr(cfg.train, name) or cfg.train.mini_batch_size  # micro 0: the whole mini-batch
        if size % shards:
            raise ConfigError(
                f"train.{name}: {size} rows do not divide over the {shards} batch shards of the mesh "
                f"(data x fsdp = {dict(mesh.shape)}); use a multiple of {shards} or a smaller mesh")


def _compile_step(cfg: ExperimentConfig, model_config: ModelConfig, params: Params, mesh: Any):
    """The jitted update step and the initial state, from the config (an edge)."""
    per_step = cfg.train.inner_epochs * (cfg.rollout_batch_size // cfg.train.mini_batch_size)
    optimizer = optimizer_from_config(cfg.optimizer, total_steps=cfg.train.steps * per_step)
    objective = policy_objective(model_config, cfg.loss, max_completion_len=cfg.sampling.max_new_tokens,
                                 temperature=cfg.sampling.temperature or 1.0)
    step_fn, shardings = make_train_step(objective, optimizer, mesh, param_specs(model_config),
                                         micro_batch_size=cfg.train.micro_batch_size)
    state = init_train_state(params, optimizer, jax.random.key(cfg.seed),
                             with_reference=objective.uses_reference, shardings=shardings)
    return step_fn, state


def _refresh_reference(state: TrainState) -> TrainState:
    if state.ref_params is None:
        return state
    return state._replace(ref_params=jax.tree.map(lambda x: x.copy(), state.params))


def _rl_step(cfg, model_config, step_fn, state, task: Task, settings, reward, timer: PhaseTimer, mesh,
             step: int):
    """Rollout, rewards and update for step `step`; returns the state and its metrics."""
    from ouroboros_jax.ppo import update as ppo_update
    timer.reset()  # the step's clock: the previous step's evaluation and checkpoint are not in it
    rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
    several = multihost.spans_processes(mesh)
    if several:  # each process reads, samples and scores its share; the batch is one global array
        if cfg.loss.dynamic_sampling or cfg.ppo.enabled:
            raise ConfigError("loss.dynamic_sampling and ppo.enabled run on one process only (the mesh "
                              f"spans {jax.process_count()} processes)")
        rollout = multihost.collect_rows(
            task.train_source, task.encode, state.params, model_config,
            num_prompts=cfg.train.prompts_per_step, settings=settings, decode=task.decode, reward=reward,
            rng=rng, mesh=mesh, timer=timer)
    else:
        rollout = collect(
            task.train_source.take, task.encode, state.params, model_config,
            num_prompts=cfg.train.prompts_per_step, settings=settings, decode=task.decode, reward=reward,
            rng=rng, mesh=mesh, dynamic_sampling=cfg.loss.dynamic_sampling,
            max_rounds=cfg.loss.max_sampling_rounds, timer=timer)
    with timer.phase("update"):
        update = ppo_update if cfg.ppo.enabled else _update
        state, metrics, tokens = update(step_fn, state, rollout, cfg, step)
    timings = timer.lap()
    if several:  # one clock: train.time_limit_s must stop every process after the same step
        timings = multihost.slowest(timings)
    metrics |= (multihost.rollout_metrics(rollout) if several else rollout_metrics(rollout)) | timings
    metrics["throughput/tokens_per_s"] = tokens / timings["time/step"]
    return state, metrics


def _evaluator(cfg: ExperimentConfig, model_config: ModelConfig, task: Task, pool: Any, mesh: Any,
               stops: tuple[int, ...]):
    examples = list(task.eval_examples or [])[: cfg.train.eval_size]
    prompt_ids = task.encode(examples) if examples else []

    def run(params: Params, step: int) -> dict[str, float]:
        return evaluate(
            params, model_config, examples, prompt_ids, decode=task.decode, score=pool.score,
            num_samples=cfg.sampling.eval_num_samples, max_new_tokens=cfg.sampling.max_new_tokens,
            stop_token_ids=stops, rng=jax.random.fold_in(jax.random.key(cfg.seed + 1), step),
            temperature=cfg.sampling.eval_temperature or cfg.sampling.temperature or 1.0,
            ks=(1, cfg.sampling.eval_num_samples), mesh=mesh,
            prompt_len_buckets=cfg.sampling.prompt_len_buckets)

    return run
