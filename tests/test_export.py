"""`python -m ouroboros_jax.export RUN_DIR OUT`: a saved run's policy as a checkpoint `transformers` loads."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

PARITY = "parity with transformers needs torch and transformers (pip install -e '.[parity]')"
torch = pytest.importorskip("torch", reason=PARITY)
transformers = pytest.importorskip("transformers", reason=PARITY)

sys.path.insert(0, str(Path(__file__).parent))
from hf_fixtures import make_checkpoint  # noqa: E402

from ouroboros_jax import checkpoint as ckpt  # noqa: E402
from ouroboros_jax.config import CheckpointConfig, ConfigError, ExperimentConfig, LoggingConfig  # noqa: E402
from ouroboros_jax.export import main  # noqa: E402
from ouroboros_jax.models import forward, load_hf_checkpoint  # noqa: E402
from ouroboros_jax.step import init_train_state  # noqa: E402
from ouroboros_jax.trainer import (  # noqa: E402
    checkpoint_directory,
    optimizer_from_config,
    policy_objective,
    prepare_run_dir,
)


def test_export_of_a_saved_run_gives_transformers_the_same_logits(tmp_path):
    source = tmp_path / "hf"
    make_checkpoint("qwen2", source)
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    cfg = ExperimentConfig(logging=LoggingConfig(run_dir=str(tmp_path / "run")),
                           checkpoint=CheckpointConfig(save_every=1))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(source)))
    prepare_run_dir(cfg)
    model_config, params = load_hf_checkpoint(source)
    # The trained policy: moved away from the source checkpoint.
    rs = np.random.RandomState(0)
    trained = jax.tree.map(lambda x: x + 0.05 * rs.randn(*x.shape).astype(np.float32), params)
    objective = policy_objective(model_config, cfg.loss, max_completion_len=cfg.sampling.max_new_tokens)
    state = init_train_state(trained, optimizer_from_config(cfg.optimizer, total_steps=cfg.train.steps),
                             jax.random.key(cfg.seed), with_reference=objective.uses_reference)
    saver = ckpt.Checkpointer(checkpoint_directory(cfg), async_save=False)
    saver.save(2, state, {"step": 2, "data_position": 0})
    saver.close()

    out = tmp_path / "out"
    assert main([cfg.logging.run_dir, str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokens = rs.randint(1, model_config.vocab_size, (2, 9))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(trained, model_config, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # Not the source checkpoint's logits: the trained params were exported.
    source_logits = np.asarray(forward(params, model_config, tokens))
    assert np.abs(source_logits - want).max() > 1e-2


def test_export_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="RUN_DIR"):
        from ouroboros_jax.export import export_run
        export_run(tmp_path, tmp_path / "out")
