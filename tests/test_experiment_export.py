"""`--export_dir` on the tiny-model experiment scripts: `transformers` loads the policy with equal logits,
and the script's character-level tokenizer with it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

PARITY = "parity with transformers needs torch and transformers (pip install -e '.[parity]')"
torch = pytest.importorskip("torch", reason=PARITY)
transformers = pytest.importorskip("transformers", reason=PARITY)

from ouroboros_jax.config import parse_cli  # noqa: E402
from ouroboros_jax.models import Tokenizer, forward, init_params  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _script(name: str):
    """experiments/<name>.py imported as module `name`, with experiments/ on sys.path: the verifier
    pool's workers import the script's verifier from it, as when the script runs."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_export(directory: Path, params, model_config, tokenizer: Tokenizer, prompt: str) -> None:
    """transformers' logits of the exported model equal ours of `params`; its tokenizer is the script's."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    tokens = np.asarray([tokenizer.encode(prompt), tokenizer.encode(prompt[::-1])])
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(forward, static_argnums=1)(jax.device_get(params), model_config, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # The tokenizer.json as written (transformers 5's AutoTokenizer puts the Qwen2 BPE pre-tokenizer on
    # every qwen2 model, whatever tokenizer_config.json says; these models read one character per token).
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    assert hf_tokenizer(prompt, add_special_tokens=False)["input_ids"] == tokenizer.encode(prompt)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    config = json.loads((directory / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_id and config["pad_token_id"] == tokenizer.pad_id
    assert Tokenizer.from_dir(directory).encode(prompt) == tokenizer.encode(prompt)


def test_reward_hacking_takes_export_dir_and_writes_a_checkpoint_transformers_loads(tmp_path):
    module = _script("reward_hacking")
    cfg = parse_cli(module.DEFAULT, args=["--export_dir", str(tmp_path / "out")])
    assert cfg.export_dir == str(tmp_path / "out")
    params = init_params(cfg.model, jax.random.key(1))
    written = module.export_policy(params, cfg, Path(cfg.export_dir) / "plain")
    assert written == tmp_path / "out" / "plain"
    _check_export(written, params, cfg.model, module.TOKENIZER, "What is 3 + 4?")


def test_quickstart_export_writes_the_tokenizer_too(tmp_path):
    module = _script("quickstart")
    cfg = parse_cli(module.DEFAULT, args=["--export_dir", str(tmp_path / "out"), "--model.d_model", "32",
                                          "--model.head_dim", "8"])
    params = init_params(cfg.model, jax.random.key(3))
    written = module.export_policy(params, cfg, cfg.export_dir)
    _check_export(written, params, cfg.model, module.TOKENIZER, "What is 47 + 85?")


def test_selfplay_collapse_takes_export_dir_and_writes_a_checkpoint_transformers_loads(tmp_path):
    import tyro

    module = _script("selfplay_collapse")
    cfg = tyro.cli(module.CollapseExperiment, default=module.CollapseExperiment(),
                   args=["--export_dir", str(tmp_path / "out")], use_underscores=True,
                   config=(tyro.conf.FlagConversionOff,))
    assert cfg.export_dir == str(tmp_path / "out")
    params = init_params(cfg.model, jax.random.key(2))
    written = module.export_policy(params, cfg.model, Path(cfg.export_dir) / "anchored")
    _check_export(written, params, cfg.model, module.TOKENIZER, "57=23+34")


def _tyro(module, config_class, args: list[str]):
    import tyro

    return tyro.cli(config_class, default=config_class(), args=args, use_underscores=True,
                    config=(tyro.conf.FlagConversionOff,))


def test_self_rewarding_takes_export_dir_and_writes_a_checkpoint_transformers_loads(tmp_path):
    module = _script("self_rewarding")
    cfg = _tyro(module, module.SelfRewardingExperiment, ["--export_dir", str(tmp_path / "out")])
    assert cfg.export_dir == str(tmp_path / "out")
    params = init_params(cfg.model, jax.random.key(4))
    written = module.export_policy(params, cfg.model, Path(cfg.export_dir) / "self")
    assert written == tmp_path / "out" / "self"
    _check_export(written, params, cfg.model, module.TOKENIZER, "47+8=55?")


def test_human_loop_takes_export_dir_and_writes_a_checkpoint_transformers_loads(tmp_path):
    module = _script("human_loop")
    cfg = parse_cli(module.DEFAULT, args=["--export_dir", str(tmp_path / "out")])
    assert cfg.export_dir == str(tmp_path / "out")
    params = init_params(cfg.model, jax.random.key(5))
    written = module.export_policy(params, cfg, cfg.export_dir)
    assert written == tmp_path / "out"
    _check_export(written, params, cfg.model, module.TOKENIZER, "What is 3 + 4?")


def test_constitutional_ai_takes_export_dir_and_writes_a_checkpoint_transformers_loads(tmp_path):
    module = _script("constitutional_ai")
    cfg = _tyro(module, module.ConstitutionalExperiment, ["--export_dir", str(tmp_path / "out")])
    assert cfg.export_dir == str(tmp_path / "out")
    params = init_params(cfg.model, jax.random.key(6))
    written = module.export_policy(params, cfg.model, cfg.export_dir)
    assert written == tmp_path / "out"
    _check_export(written, params, cfg.model, module.TOKENIZER, "47+8=54?46=0|")


def test_constitutional_ai_checkpoint_mode_exports_to_export_dir_with_the_checkpoints_tokenizer(tmp_path):
    from ouroboros_jax.models import export_hf_checkpoint, load_hf_checkpoint
    from ouroboros_jax.models.tiny import make_tiny_checkpoint

    module = _script("constitutional_ai")
    policy_dir = module.run_checkpoint.__globals__["policy_dir"]  # where --model.path runs write the policy
    ckpt = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    base = ["--model.path", str(ckpt), "--run_dir", str(tmp_path / "run")]
    assert policy_dir(_tyro(module, module.ConstitutionalExperiment, base)) == tmp_path / "run" / "policy"
    assert policy_dir(_tyro(module, module.ConstitutionalExperiment, [*base, "--hf.export", "False"])) is None
    cfg = _tyro(module, module.ConstitutionalExperiment, [*base, "--hf.export", "False",
                                                          "--export_dir", str(tmp_path / "out")])
    assert policy_dir(cfg) == tmp_path / "out"  # asked for by name: written even with --hf.export False

    model_config, params = load_hf_checkpoint(cfg.model.path)  # as run_checkpoint exports its policy
    written = export_hf_checkpoint(params, model_config, policy_dir(cfg))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(written).float().eval()
    source = Tokenizer.from_dir(ckpt)
    tokens = np.asarray([source.encode("What is 1 plus 2?"), source.encode("?2 sulp 1 si tahW")])
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(forward, static_argnums=1)(params, model_config, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the checkpoint's tokenizer, as it was
        assert (written / name).read_bytes() == (ckpt / name).read_bytes()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(written)
    assert hf_tokenizer("What is 1 plus 2?", add_special_tokens=False)["input_ids"] == tokens[0].tolist()
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (written, ckpt))
    assert config["eos_token_id"] == source_config["eos_token_id"]


def _shifted(params, by: float):
    """Trained stand-in parameters: every weight moved by `by` (each arm its own, so a swap shows)."""
    return jax.tree.map(lambda x: x + by, params)


def _skip_training(module, monkeypatch) -> None:
    """The script's model initialised unsharded (no compile) and its warm-start a no-op."""
    monkeypatch.setattr(module, "init_sharded", lambda config, key, mesh: init_params(config, key))
    monkeypatch.setattr(module, "supervised_warmstart", lambda params, *a, **k: params)


TINY_CHAR_MODEL = ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_kv_heads", "2",
                   "--model.d_ff", "64"]


def test_self_rewarding_main_writes_each_arms_last_model_to_its_own_directory(tmp_path, monkeypatch):
    """The script's wiring, without its training: each arm's returned model lands in DIR/<arm>."""
    module = _script("self_rewarding")
    trained = []

    def iterations(params, model_config, prompts, **kwargs):
        trained.append(_shifted(params, 0.01 * (len(trained) + 1)))
        return trained[-1], [{"iteration": 0, "accuracy": 0.5, "judge_agreement": 0.5}]

    _skip_training(module, monkeypatch)
    monkeypatch.setattr(module, "run_self_rewarding", iterations)
    monkeypatch.setattr(module, "plot_arms", lambda *a, **k: tmp_path / "plot.png")
    module.main(["--run_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "out"), *TINY_CHAR_MODEL])
    model_config = _tyro(module, module.SelfRewardingExperiment, TINY_CHAR_MODEL).model
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grounded", "self"]
    for arm, params in zip(("self", "grounded"), trained, strict=True):
        _check_export(tmp_path / "out" / arm, params, model_config, module.TOKENIZER, "47+8=55?")


def test_constitutional_ai_main_writes_the_rlaif_policy(tmp_path, monkeypatch):
    """The script's wiring, without its training: the policy the RLAIF phase returns lands in DIR."""
    from types import SimpleNamespace

    module = _script("constitutional_ai")
    trained = []

    def rlaif(cfg, feedback_params, sl_params, *args, **kwargs):
        trained.append(_shifted(sl_params, 0.02))
        return {"pairs": 1, "rm_accuracy": 0.5, "before": 0.5, "after": 0.5, "params": trained[-1]}

    revise = lambda generator, prompts, *a, **k: SimpleNamespace(initial=["1"] * len(prompts),
                                                                  final=["1"] * len(prompts))
    _skip_training(module, monkeypatch)
    monkeypatch.setattr(module, "gen", lambda *a, **k: lambda prompts, *b, **c: ["1"] * len(prompts))
    monkeypatch.setattr(module, "critique_and_revise", revise)
    monkeypatch.setattr(module, "sft_on_revisions", lambda params, *a, **k: (_shifted(params, 0.01), 0))
    monkeypatch.setattr(module, "accuracy", lambda *a, **k: 0.5)
    monkeypatch.setattr(module, "rlaif_phase", rlaif)
    module.main(["--run_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "out"), *TINY_CHAR_MODEL])
    model_config = _tyro(module, module.ConstitutionalExperiment, TINY_CHAR_MODEL).model
    _check_export(tmp_path / "out", trained[0], model_config, module.TOKENIZER, "47+8=54?46=0|")


def test_human_loop_main_writes_the_trained_policy(tmp_path, monkeypatch):
    """The script's wiring, without its training: the policy `train` returns lands in DIR."""
    from types import SimpleNamespace

    module = _script("human_loop")
    trained = []

    def train(cfg, *, params, **kwargs):
        trained.append(_shifted(params, 0.01))
        return SimpleNamespace(state=SimpleNamespace(params=trained[-1]), evals=[{"eval/pass@1": 0.5}],
                               history=[{"accuracy": 0.5}])

    _skip_training(module, monkeypatch)
    monkeypatch.setattr(module, "train", train)
    module.main(["--logging.run_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "out")])
    _check_export(tmp_path / "out", trained[0], module.DEFAULT.model, module.TOKENIZER, "What is 3 + 4?")


def test_instructgpt_main_writes_the_ppo_policy_with_the_checkpoints_tokenizer(tmp_path, monkeypatch):
    """The script's wiring, without its training: the policy PPO returns lands in DIR, with the
    tokenizer files of --model.path."""
    from types import SimpleNamespace

    from ouroboros_jax.models import load_hf_checkpoint
    from ouroboros_jax.models.tiny import make_tiny_checkpoint

    module = _script("instructgpt")
    ckpt = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1 plus 2?", "response": "3", "chosen": "3",
                                "rejected": "4"}) + "\n")
    trained = []

    def train(cfg, *, params, **kwargs):
        trained.append(_shifted(params, 0.01))
        return SimpleNamespace(state=SimpleNamespace(params=trained[-1]), history=[], evals=[])

    monkeypatch.setattr(module, "supervised", lambda params, *a, **k: (params, []))
    monkeypatch.setattr(module, "train_reward_model", lambda params, *a, **k: SimpleNamespace(
        params=params, history=[]))
    monkeypatch.setattr(module, "train", train)
    monkeypatch.setattr(module, "finish", lambda *a: None)
    module.main(["--model.path", str(ckpt), "--demonstrations", str(rows), "--preferences", str(rows),
                 "--prompts", str(rows), "--sft-batch", "8", "--rm-batch", "8", "--train.eval_every", "0",
                 "--sampling.max_new_tokens", "8", "--sampling.prompt_len_buckets", "256",
                 "--logging.run_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    model_config, params = load_hf_checkpoint(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokens = np.asarray([Tokenizer.from_dir(ckpt).encode("What is 1 plus 2?")])
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(forward, static_argnums=1)(jax.device_get(trained[0]), model_config, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()


@pytest.mark.slow  # warm-start, a reward model and one RL step, end to end (~1 min of CPU)
def test_reward_hacking_smoke_run_exports_the_trained_arm(tmp_path, monkeypatch):
    module = _script("reward_hacking")
    monkeypatch.setattr(module, "RM_STEPS", 4)
    monkeypatch.setattr(module, "ENSEMBLE", 1)
    results = module.main([
        "--arms", "plain", "--warmstart.steps", "4", "--train.steps", "1", "--train.prompts_per_step", "2",
        "--train.mini_batch_size", "16", "--train.micro_batch_size", "16", "--train.eval_every", "1",
        "--train.eval_size", "4", "--sampling.eval_num_samples", "2", "--verifier.num_workers", "1",
        "--logging.run_dir", str(tmp_path / "run"), "--export_dir", str(tmp_path / "out")])
    out, params = tmp_path / "out" / "plain", results["plain"]["params"]
    _check_export(out, params, module.DEFAULT.model, module.TOKENIZER, "What is 3 + 4?")


@pytest.mark.slow  # warm-start and one generation of each arm, end to end (~40 s of CPU)
def test_selfplay_collapse_smoke_run_exports_both_arms(tmp_path):
    module = _script("selfplay_collapse")
    tiny = []
    for arm in ("collapse", "anchored"):
        tiny += [f"--{arm}.generations", "1", f"--{arm}.prompts_per_generation", "8", f"--{arm}.train_steps",
                 "1", f"--{arm}.batch_size", "8", f"--{arm}.batch_prompts", "8", f"--{arm}.eval_k", "2",
                 f"--{arm}.sampling.eval_num_samples", "2"]
    results = module.main(["--warmstart.steps", "4", "--run_dir", str(tmp_path / "run"),
                           "--export_dir", str(tmp_path / "out"), *tiny])
    model_config = module.CollapseExperiment().model
    for arm in ("collapse", "anchored"):
        _check_export(tmp_path / "out" / arm, results[arm].params, model_config, module.TOKENIZER, "57=23+34")
