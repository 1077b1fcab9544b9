"""The documented smoke test: a tiny random checkpoint from the public helper runs a script in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from ouroboros_jax.models import Tokenizer, load_hf_checkpoint
from ouroboros_jax.models.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_checkpoint_loads_with_its_tokenizer(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    cfg, params = load_hf_checkpoint(path)
    assert (cfg.family, cfg.vocab_size, cfg.n_layers, cfg.d_model) == ("llama", 320, 2, 32)
    tok = Tokenizer.from_dir(path)
    assert tok.decode(tok.encode("What is 2 + 3?")) == "What is 2 + 3?"
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    assert eos == [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    assert "<|start_header_id|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.slow
def test_the_smoke_flags_run_a_script_in_seconds(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import hf_run

    script = ROOT / "experiments" / "countdown_dr_grpo.py"
    spec = importlib.util.spec_from_file_location("smoke_countdown", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    started = time.perf_counter()
    result = module.main(["--model.path", str(ckpt), *hf_run.SMOKE_FLAGS, "--logging.run_dir",
                          str(tmp_path / "run"), "--logging.no_console", "--logging.no_tensorboard"])
    elapsed = time.perf_counter() - started
    assert len(result.history) == 2 and len(result.evals) == 2
    assert elapsed < 180, elapsed
    print(f"smoke test: {elapsed:.0f} s")
