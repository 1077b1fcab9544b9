"""ouroboros-jax: reinforcement learning of language models with verifiable rewards.

Every loop is one shape: prompts -> `rollout` (the jitted sampler) ->
completions -> a reward source (`rewards`) -> an objective (`objectives`) on a
`batch.Batch` -> the one jitted update step (`step`) -> new parameters. The
trainer (`trainer.train`) and the self-play loops (`selfplay`) differ only in
the objective and the reward source they plug in.

Array names, einsum strings and shape annotations use one dimension legend
(B rows, G group, T positions, P prompt width, C completion width, ...),
written out in docs/dimensions.md.
"""

__version__ = "0.1.0"
