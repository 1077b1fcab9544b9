"""Model parity with `transformers`, checkpoint import/export, and bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import make_checkpoint  # noqa: E402

from ouroboros_jax.config import ModelConfig  # noqa: E402
from ouroboros_jax.models import (  # noqa: E402
    CheckpointError,
    export_hf_checkpoint,
    forward,
    forward_padded,
    hidden_states,
    init_cache,
    init_params,
    load_hf_checkpoint,
    logits_from_hidden,
    reward_scores,
)
from ouroboros_jax.models.safetensors_io import SafetensorsFile  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3"]


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(request.param, path)
    return request.param, path, model


TOKENS = np.random.RandomState(0).randint(0, 97, (3, 40)).astype(np.int32)


def test_logits_match_transformers(checkpoint):
    family, path, model = checkpoint
    cfg, params = load_hf_checkpoint(path)
    assert cfg.family == family
    ours = np.asarray(forward(params, cfg, jnp.asarray(TOKENS)))
    assert ours.shape == (3, 40, 97)
    np.testing.assert_allclose(ours, torch_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_family_features_are_read(checkpoint):
    family, path, _ = checkpoint
    cfg, params = load_hf_checkpoint(path)
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert ("q_norm_LH" in params["layers"]) == (family == "qwen3")
    assert ("lm_head_DV" in params) == (family != "qwen2")  # qwen2 fixture ties embeddings
    assert cfg.rope_scaling == ("llama3" if family == "llama" else "")
    assert cfg.n_kv_heads == 2 and cfg.n_heads == 4


def test_export_reloads_in_transformers(checkpoint, tmp_path):
    family, path, model = checkpoint
    cfg, params = load_hf_checkpoint(path)
    export_hf_checkpoint(params, cfg, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), torch_logits(model, TOKENS), atol=1e-5)
    cfg2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert cfg2 == cfg.__class__(**{**cfg.__dict__, "path": str(tmp_path / "out")})
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_checkpoint_with_index(tmp_path):
    model = make_checkpoint("qwen2", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    cfg, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(np.asarray(forward(params, cfg, jnp.asarray(TOKENS))),
                               torch_logits(model, TOKENS), atol=1e-4)


def test_export_writes_sharded_index(tmp_path):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    params = init_params(cfg, jax.random.key(0))
    export_hf_checkpoint(params, cfg, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, back = load_hf_checkpoint(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, back)


def test_bfloat16_load_and_export(checkpoint, tmp_path):
    _, path, model = checkpoint
    cfg, params = load_hf_checkpoint(path, dtype="bfloat16")
    assert params["embed_VD"].dtype == jnp.bfloat16
    logits = forward(params, cfg, jnp.asarray(TOKENS))
    assert logits.dtype == jnp.float32  # log-softmax side stays float32
    ref = torch_logits(model, TOKENS)
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max()
    export_hf_checkpoint(params, cfg, tmp_path)
    assert SafetensorsFile(tmp_path / "model.safetensors")["model.norm.weight"].dtype.name == "bfloat16"


def test_padding_and_positions_do_not_change_real_tokens(checkpoint):
    _, path, _ = checkpoint
    cfg, params = load_hf_checkpoint(path)
    row = TOKENS[0, :20]
    plain = forward(params, cfg, jnp.asarray(row[None]))[0]
    padded = np.zeros((2, 27), np.int32)
    padded[0, 7:] = row  # left padded
    padded[1, :20] = row  # right padded
    mask = np.zeros((2, 27), bool)
    mask[0, 7:] = True
    mask[1, :20] = True
    out = forward_padded(params, cfg, jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(out[0, 7:], plain, atol=1e-5)
    np.testing.assert_allclose(out[1, :20], plain, atol=1e-5)


def test_kv_cache_prefill_then_decode_equals_full_forward(checkpoint):
    _, path, _ = checkpoint
    cfg, params = load_hf_checkpoint(path)
    tokens = jnp.asarray(TOKENS[:, :16])
    full = forward(params, cfg, tokens)
    cache = init_cache(cfg, batch=3, length=24)
    kv_mask = jnp.arange(24)[None, :].repeat(3, 0) < 16
    h, cache = hidden_states(params, cfg, tokens[:, :10], kv_mask=kv_mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(logits_from_hidden(params, cfg, h), full[:, :10], atol=1e-5)
    for t in range(10, 16):
        h, cache = hidden_states(params, cfg, tokens[:, t:t + 1], kv_mask=kv_mask, cache=cache,
                                 cache_index=t)
        np.testing.assert_allclose(logits_from_hidden(params, cfg, h)[:, 0], full[:, t], atol=1e-5)


@pytest.mark.slow  # 10-15 s: the slow set (CI runs it) keeps the default suite under 10 minutes
def test_remat_matches_values_and_gradients():
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
    params = init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(TOKENS[:2, :12] % 40)

    def loss(p, c):
        return jax.nn.log_softmax(forward(p, c, tokens)).mean()

    remat = cfg.__class__(**{**cfg.__dict__, "remat": True})
    v1, g1 = jax.value_and_grad(loss)(params, cfg)
    v2, g2 = jax.value_and_grad(loss)(params, remat)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reward_model_matches_transformers(family, tmp_path):
    model = make_checkpoint(family, tmp_path, reward=True)
    cfg, params = load_hf_checkpoint(tmp_path)
    assert params["score_D"].shape == (32,)
    tokens = TOKENS[:, :12].copy()
    tokens[tokens == 0] = 1
    tokens[1, 8:] = 0  # right padding with pad_token_id 0
    mask = tokens != 0
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    ours = reward_scores(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    export_hf_checkpoint(params, cfg, tmp_path / "out", extra_config={"pad_token_id": 0})
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            again(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy(),
            ref, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input: errors name the file and the tensor.


@pytest.fixture()
def qwen_dir(tmp_path):
    make_checkpoint("qwen2", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf_checkpoint(tmp_path)


def test_missing_weights(qwen_dir):
    (qwen_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_hf_checkpoint(qwen_dir)


def test_truncated_file_names_file_and_tensor(qwen_dir):
    f = qwen_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': file is truncated"):
        load_hf_checkpoint(qwen_dir)


def test_corrupt_header(qwen_dir):
    f = qwen_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json !!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf_checkpoint(qwen_dir)


def test_unknown_architecture(qwen_dir):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (qwen_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf_checkpoint(qwen_dir)


def test_shape_mismatch_names_tensor(qwen_dir):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (qwen_dir / "config.json").write_text(json.dumps(cfg))
    expected = r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .* does not fit"
    with pytest.raises(CheckpointError, match=expected):
        load_hf_checkpoint(qwen_dir)


def test_missing_tensor_is_named(qwen_dir, tmp_path):
    f = SafetensorsFile(qwen_dir / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f if k != "model.layers.1.self_attn.k_proj.bias"}
    from ouroboros_jax.models.safetensors_io import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(qwen_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        load_hf_checkpoint(tmp_path)


def test_integer_tensor_is_rejected(qwen_dir, tmp_path):
    f = SafetensorsFile(qwen_dir / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    from ouroboros_jax.models.safetensors_io import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(qwen_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype int32"):
        load_hf_checkpoint(tmp_path)


def test_unsupported_rope_scaling(qwen_dir):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    (qwen_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        load_hf_checkpoint(qwen_dir)


def test_char_level_tokenizer_keeps_every_character_including_newlines():
    from ouroboros_jax.models import Tokenizer

    tok = Tokenizer.char_level("ab \n")
    ids = tok.encode("a\n\nb b")
    # specials pad, bos, eos take ids 0-2; then a=3, b=4, " "=5, "\n"=6
    assert ids == [3, 6, 6, 4, 5, 4]
    assert tok.decode(ids) == "a\n\nb b"


def test_char_level_tokenizer_refuses_characters_outside_its_alphabet():
    from ouroboros_jax.models import Tokenizer

    tok = Tokenizer.char_level("ab ")
    with pytest.raises(ValueError, match=r"text 'ab c!': characters '!c' are outside .* alphabet ' ab'"):
        tok.encode("ab c!")
    with pytest.raises(ValueError, match="'x'"):
        tok.encode_batch(["ab", "xa"])
    assert tok.encode("a<eos>b") == [3, 2, 4]  # a special token's spelling is not foreign text
