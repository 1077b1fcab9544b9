"""Recursive loops built on the trainer: generations with collapse guards,
proposer/solver self-play on the code executor, reward-model and preference loops."""
