"""Hugging Face interop: logits equal transformers', exact round trips, no pickles."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hf, model, runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
FAMILIES = {
    "llama3_untied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama2_tied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=4,
                                                    tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=1,
                                                  sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2,
                                              tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64),
    "llama32_tied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True, head_dim=16,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral_window": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2,
                                                         sliding_window=5),
    "qwen3_tied_gqa": lambda: transformers.Qwen3Config(
        **SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "qwen3_mha_untied": lambda: transformers.Qwen3Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3_sliding": lambda: transformers.Qwen3Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=5, max_window_layers=1),
    "gemma2_odd": lambda: transformers.Gemma2Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=16,
        sliding_window=6, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0),
    "gemma2_mha": lambda: transformers.Gemma2Config(
        **SMALL, num_key_value_heads=4, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
        tie_word_embeddings=False),
    "gemma3_7layers": lambda: transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 7}, num_key_value_heads=2, head_dim=16,
        sliding_window=6, query_pre_attn_scalar=16,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2),
    "phi3_window_mha": lambda: transformers.Phi3Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=4, sliding_window=5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def make_hf_model(family, path, shard=False):
  torch.manual_seed(0)
  m = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](),
                                                    attn_implementation="eager")
  with torch.no_grad():
    for p in m.parameters():  # non-trivial norms and biases, too
      p.normal_(0.0, 0.1)
  m.eval()
  m.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
  return m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
  ref = make_hf_model(family, tmp_path, shard=family == "llama3_untied")
  if family == "llama3_untied":
    assert os.path.exists(tmp_path / hf.SAFETENSORS_INDEX)  # the sharded path is exercised
  cfg, params = hf.load_hf(str(tmp_path))
  cfg.attention = "xla"
  tokens = np.random.default_rng(0).integers(0, 96, size=(2, 24))
  with torch.no_grad():
    expected = ref(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), cfg))
  rel = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
  assert rel < 1e-4, rel


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_reproduces_the_weights_exactly(family, tmp_path):
  ref = make_hf_model(family, tmp_path / "in")
  cfg, params = hf.load_hf(str(tmp_path / "in"))
  hf.save_hf(cfg, params, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                          attn_implementation="eager")
  want, got = ref.state_dict(), back.state_dict()
  assert set(got) == set(want)
  for name, tensor in want.items():
    assert torch.equal(got[name], tensor), name
  # The exported config.json rebuilds the same computation (windows, caps, scales).
  tokens = torch.tensor(np.random.default_rng(1).integers(0, 96, size=(2, 24)))
  with torch.no_grad():
    torch.testing.assert_close(back(tokens).logits, ref(tokens).logits, rtol=0, atol=0)


def test_sharded_export_loads_in_transformers(tmp_path):
  make_hf_model("qwen2", tmp_path / "in")
  cfg, params = hf.load_hf(str(tmp_path / "in"))
  hf.save_hf(cfg, params, str(tmp_path / "out"), max_shard_bytes=30_000)
  assert os.path.exists(tmp_path / "out" / hf.SAFETENSORS_INDEX)
  cfg2, params2 = hf.load_hf(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_pickles_are_refused_with_a_clear_error(tmp_path):
  make_hf_model("llama2_tied", tmp_path)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(hf.HFError, match="pytorch_model.bin is a pickle-based format, which "
                                       "jaxlm never loads"):
    hf.load_hf(str(tmp_path))


def test_unsupported_configs_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(hf.HFError, match=r"config.json: model_type 'bert' is not supported"):
    hf.load_hf(str(tmp_path))


def test_convert_tool_both_ways(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  ref = make_hf_model("mistral", tmp_path / "hf")
  for args in (["--hf", tmp_path / "hf", "--to_jaxlm", tmp_path / "jx"],
               ["--jaxlm", tmp_path / "jx", "--to_hf", tmp_path / "back"]):
    result = subprocess.run([sys.executable, "tools/convert_hf.py", *map(str, args)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no orbax INFO lines unless --verbosity asks
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
  for name, tensor in ref.state_dict().items():
    assert torch.equal(back.state_dict()[name], tensor), name


def test_init_from_a_hf_directory_takes_its_shape_and_weights(tmp_path):
  from conftest import small_config
  from jaxlm import tasks
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**SMALL, "vocab_size": 640}, num_key_value_heads=2)
  ref = transformers.AutoModelForCausalLM.from_config(cfg)
  ref.save_pretrained(tmp_path / "hf")
  # The run's own model section says something else: init_from's shape wins.
  config = small_config(**{"init_from": str(tmp_path / "hf"), "steps": 1, "eval_every": 0,
                           "optimizer.lr": 1e-12, "optimizer.weight_decay": 0.0,
                           "model.d_model": 48, "model.num_layers": 3})
  tasks.run(config, str(tmp_path / "run"))
  runs.export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  out = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  for name, tensor in ref.state_dict().items():
    np.testing.assert_allclose(out.state_dict()[name].numpy(), tensor.numpy(), atol=1e-7)


# One family in CI; the other three (their logits and round trips are checked above) in
# the slow tier: a launcher process each costs 15 to 25 s of CI's budget.
@pytest.mark.parametrize("family", ["qwen3_tied_gqa",
                                    pytest.param("gemma2_odd", marks=pytest.mark.slow),
                                    pytest.param("gemma3_7layers", marks=pytest.mark.slow),
                                    pytest.param("phi3_window_mha", marks=pytest.mark.slow)])
def test_sft_through_the_launcher_on_an_imported_family_and_export_it(family, tmp_path):
  """A few SFT steps from a HF directory of each new family, then the export: its
  config.json and weights load in transformers and give jaxlm's logits."""
  import subprocess
  import sys

  from conftest import word_tokenizer
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  tok = word_tokenizer(tmp_path, "explain what this python function does return the value "
                       "of a list given key")
  torch.manual_seed(0)
  cfg = FAMILIES[family]()
  cfg.vocab_size = 384  # room for the 320 pieces
  ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  ref.save_pretrained(tmp_path / "hf")
  os.replace(tok.path, tmp_path / "hf" / "tokenizer.model")
  run = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.launch", "--config", "configs/sft_tiny.py",
       f"--workdir={run}", f"--config.init_from={tmp_path / 'hf'}", "--config.steps=2",
       "--config.eval_every=0", "--config.checkpoint_every=2", "--config.data.seq_len=64",
       "--config.data.batch_size=8", "--config.log_every=1", "--config.mesh.fsdp=4",
       "--config.mesh.tensor=2"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 2/2" in result.stdout
  runs.export_hf(str(run), str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                          attn_implementation="eager")
  assert type(back).__name__ == type(ref).__name__
  m, params, _, _ = runs.load_jaxlm(str(run))
  tokens = np.random.default_rng(0).integers(0, 320, size=(2, 24))
  m.dtype, m.attention = "float32", "xla"  # the run trains in bf16; compare in float32
  got = np.asarray(model.forward(params, jnp.asarray(tokens), m))
  with torch.no_grad():
    want = back(torch.tensor(tokens)).logits.numpy()
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


@pytest.mark.parametrize("preset", ["qwen3_1_7b", "gemma2_2b", "gemma3_1b", "llama3_8b"])
def test_presets_have_the_published_models_shapes(preset):
  """Each preset's export config builds, in transformers, a model with jaxlm's own
  parameter count (on the meta device: no memory, nothing downloaded)."""
  from jaxlm.config import model_config
  m = model_config(preset, dtype="float32")
  config = transformers.AutoConfig.for_model(**hf.hf_config_from_model(m, "bfloat16"))
  with torch.device("meta"):
    ref = transformers.AutoModelForCausalLM.from_config(config)
  want = sum(p.numel() for p in ref.parameters())  # tied weights counted once
  shapes = model.param_shapes_and_axes(m)
  got = sum(int(np.prod(s)) for s, _ in jax.tree.leaves(shapes, is_leaf=model._is_spec))
  assert got == want
