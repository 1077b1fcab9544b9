"""Recursive loops built on the trainer.

- `generations`: the Ouroboros loop (sample, judge, select, train) over
  generations, with data policies, per-generation reports and a collapse guard
  (`selection` and `reports` hold its host-side parts).
- `code_selfplay`: one policy proposes programs that the sandbox turns into
  verified deduction / abduction / induction tasks, and solves them
  (`code_tasks`, `code_executor`).
- `reward_model`: Bradley-Terry reward models (their use as RL rewards is
  `ouroboros_jax.rewards`) and a reward-hacking tracker.
- `preference`: DPO / IPO from preference pairs and SPIN iterations.
"""

from ouroboros_jax.selfplay.code_executor import CodeExecutor, ExecSettings, check_solution, validate_proposal
from ouroboros_jax.selfplay.code_selfplay import (
    CodeSelfPlayConfig,
    learnability_reward,
    role_advantages,
    run_code_selfplay,
    selfplay_step,
)
from ouroboros_jax.selfplay.code_tasks import CodeTask, TaskBuffer, TaskError
from ouroboros_jax.selfplay.generations import (
    CollapseWarning,
    GenerationsConfig,
    GenerationsResult,
    GenerationTask,
    anchor_loglik,
    evaluate_generation,
    run_generations,
)
from ouroboros_jax.selfplay.preference import (
    read_preference_pairs,
    run_spin,
    spin_iteration,
    spin_pairs,
    train_preference,
)
from ouroboros_jax.selfplay.reports import CollapseGuard, answer_diversity, distinct_n
from ouroboros_jax.selfplay.reward_model import (
    RewardHackingTracker,
    init_reward_model,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)

__all__ = [
    "CodeExecutor", "CodeSelfPlayConfig", "CodeTask", "CollapseGuard", "CollapseWarning", "ExecSettings",
    "GenerationTask", "GenerationsConfig", "GenerationsResult", "RewardHackingTracker", "TaskBuffer",
    "TaskError", "anchor_loglik", "answer_diversity", "check_solution", "distinct_n", "evaluate_generation",
    "learnability_reward", "role_advantages", "run_code_selfplay", "run_generations", "run_spin",
    "selfplay_step", "spin_pairs", "train_preference", "train_reward_model", "validate_proposal",
    "init_reward_model", "load_reward_model", "read_preference_pairs", "save_reward_model", "spin_iteration",
]
