"""Scalable oversight: supervising models on tasks the supervisor cannot check whole.

- `classifier`: small MLP classifiers / reward models trained through the one update step.
- `rrm`: recursive reward modeling, a chain of reward models with anchor and consistency checks.
- `weak_to_strong`: weak-to-strong supervision and the performance gap recovered (PGR).
"""
