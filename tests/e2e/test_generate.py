"""The sampling engine: log-probs equal the training forward's, stops, filtering, the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GEMMA_LIKE, QWEN3_LIKE, small_config, small_model
from jaxlm import generate, loop, model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [np.array([2, 5, 6, 7]), np.array([2, 9]), np.array([2, 11, 12, 13, 14, 15, 16])]


def training_logprobs(params, cfg, prompt, completion, temperature):
  seq = np.concatenate([prompt, completion])
  logits = model.forward(params, jnp.asarray(seq[:-1])[None], cfg)[0] / temperature
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  return np.take_along_axis(logp, seq[1:, None], -1)[:, 0][len(prompt) - 1:]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma_like", "qwen3_like"])
@pytest.mark.parametrize("sampling", [
    generate.Sampling(max_new_tokens=12, temperature=1.0),
    generate.Sampling(max_new_tokens=12, temperature=0.7, top_k=10, top_p=0.9),
    generate.Sampling(max_new_tokens=12, temperature=0.0)])
def test_engine_logprobs_equal_the_training_forward(family, sampling):
  variant = {"gemma_like": GEMMA_LIKE, "qwen3_like": QWEN3_LIKE}.get(family, {"family": family})
  cfg = small_model(dtype="float32", vocab_size=64, max_seq_len=64, **variant)
  params = model.init(cfg, jax.random.PRNGKey(0))
  sharder = loop.make_sharder(small_config())
  engine = generate.Engine(cfg, eos_id=3, sharder=sharder)
  out = engine.generate(params, PROMPTS, jax.random.PRNGKey(1), sampling)
  temperature = sampling.temperature or 1.0
  for i, prompt in enumerate(PROMPTS):
    n = out.lengths[i]
    assert (out.tokens[i, n:] == 0).all() and (out.logprobs[i, n:] == 0).all()
    assert out.finished[i] == (out.tokens[i, n - 1] == 3)
    want = training_logprobs(params, cfg, prompt, out.tokens[i, :n], temperature)
    np.testing.assert_allclose(out.logprobs[i, :n], want, atol=2e-5)
  if sampling.temperature == 0:  # greedy: each token is the training forward's argmax
    for i, prompt in enumerate(PROMPTS):
      seq = np.concatenate([prompt, out.tokens[i, :out.lengths[i]]])
      logits = model.forward(params, jnp.asarray(seq[:-1])[None], cfg)[0]
      np.testing.assert_array_equal(np.argmax(logits, -1)[len(prompt) - 1:], seq[len(prompt):])


def test_joined_projections_decode_as_the_separate_ones():
  """Without tensor parallelism the engine joins wq/wk/wv and w_gate/w_up (fewer decode
  kernels); with it, it keeps them apart. Both give the same tokens and log-probs."""
  cfg = small_model(dtype="float32", vocab_size=64, max_seq_len=64, **QWEN3_LIKE)
  params = model.init(cfg, jax.random.PRNGKey(0))
  tp = small_config()
  tp.mesh.fsdp, tp.mesh.tensor = 4, 2
  sharders = [loop.make_sharder(small_config()), loop.make_sharder(tp)]
  assert [generate._shards_heads(s) for s in sharders] == [False, True]
  layer = model.fuse_projections(model.unstack_layers(params), cfg)["layers"][0]
  assert "wqkv" in layer and "w_gate_up" in layer and "wq" not in layer
  sampling = generate.Sampling(max_new_tokens=12, temperature=1.0)
  fused, apart = (generate.Engine(cfg, eos_id=3, sharder=s).generate(
      params, PROMPTS, jax.random.PRNGKey(1), sampling) for s in sharders)
  np.testing.assert_array_equal(fused.tokens, apart.tokens)
  np.testing.assert_allclose(fused.logprobs, apart.logprobs, atol=2e-5)


def test_a_prompts_samples_share_its_prefill():
  """samples=G prefills each prompt once and decodes its G rows from copies of its cache:
  greedy rows equal those of the prompt repeated G times, and sampled rows' log-probs
  are the training forward's on their own prompt."""
  cfg = small_model(dtype="float32", vocab_size=64, max_seq_len=64, **GEMMA_LIKE)
  params = model.init(cfg, jax.random.PRNGKey(0))
  engine = generate.Engine(cfg, eos_id=3, sharder=loop.make_sharder(small_config()))
  G = 4
  greedy = generate.Sampling(max_new_tokens=10, temperature=0.0)
  shared = engine.generate(params, PROMPTS, jax.random.PRNGKey(1), greedy, samples=G)
  repeated = engine.generate(params, [p for p in PROMPTS for _ in range(G)],
                             jax.random.PRNGKey(1), greedy)
  assert shared.tokens.shape == (len(PROMPTS) * G, 10)
  np.testing.assert_array_equal(shared.tokens, repeated.tokens)
  np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=2e-5)
  sampled = engine.generate(params, PROMPTS, jax.random.PRNGKey(2),
                            generate.Sampling(max_new_tokens=10, temperature=1.0), samples=G)
  for row in range(len(PROMPTS) * G):
    n = sampled.lengths[row]
    want = training_logprobs(params, cfg, PROMPTS[row // G], sampled.tokens[row, :n], 1.0)
    np.testing.assert_allclose(sampled.logprobs[row, :n], want, atol=2e-5)
  for i in range(len(PROMPTS)):  # a group's samples are G draws, not one draw G times
    assert len({tuple(t) for t in sampled.tokens[i * G:(i + 1) * G]}) > 1


MORE_PROMPTS = PROMPTS + [np.array([2, 20, 21]), np.array([2, 30, 31, 32, 33, 34]),
                         np.array([2, 40]), np.array([2, 44, 45, 46, 47])]


@pytest.mark.parametrize("family", ["llama", "gemma_like"])
def test_refilled_rows_decode_as_a_batch_of_their_own(family):
  """Two rows for seven prompts of their own budgets: a row that finishes takes the next
  prompt (continuous batching), its keys and values in a ring the other row keeps
  writing. Tokens equal those of all prompts decoded at once (a completion samples with
  its own key), every token's log-prob is the training forward's (gemma_like:
  sliding-window layers over the ring), and each row stops at its budget."""
  variant = GEMMA_LIKE if family == "gemma_like" else {}
  cfg = small_model(dtype="float32", vocab_size=64, max_seq_len=64, **variant)
  params = model.init(cfg, jax.random.PRNGKey(0))
  engine = generate.Engine(cfg, eos_id=3, chunk=3)
  budgets = [12, 3, 7, 12, 1, 5, 9]
  for sampling in (generate.Sampling(max_new_tokens=12, temperature=0.0),
                   generate.Sampling(max_new_tokens=12, temperature=1.0)):
    out = engine.generate(params, MORE_PROMPTS, jax.random.PRNGKey(1), sampling, rows=2,
                          max_new_tokens=budgets)
    assert out.tokens.shape == (len(MORE_PROMPTS), 12)
    for i, prompt in enumerate(MORE_PROMPTS):
      n = out.lengths[i]
      assert n <= budgets[i] and (n == budgets[i] or out.finished[i])
      assert (out.tokens[i, n:] == 0).all() and (out.logprobs[i, n:] == 0).all()
      want = training_logprobs(params, cfg, prompt, out.tokens[i, :n], sampling.temperature or 1)
      np.testing.assert_allclose(out.logprobs[i, :n], want, atol=2e-5)
    at_once = engine.generate(params, MORE_PROMPTS, jax.random.PRNGKey(1), sampling,
                              max_new_tokens=budgets)
    np.testing.assert_array_equal(out.tokens, at_once.tokens)
    np.testing.assert_array_equal(out.lengths, at_once.lengths)


def test_refilled_groups_share_their_prompts_prefill():
  """Eight rows (one a device of the 8 fake devices' mesh) for seven prompts x 2 samples:
  refills start a prompt's samples from one prefill; greedy rows equal each prompt
  decoded alone."""
  cfg = small_model(dtype="float32", vocab_size=64, max_seq_len=64)
  params = model.init(cfg, jax.random.PRNGKey(0))
  engine = generate.Engine(cfg, eos_id=3, sharder=loop.make_sharder(small_config()), chunk=2)
  greedy = generate.Sampling(max_new_tokens=10, temperature=0.0)
  prompts = MORE_PROMPTS
  out = engine.generate(params, prompts, jax.random.PRNGKey(1), greedy, rows=8, samples=2)
  alone = engine.generate(params, prompts, jax.random.PRNGKey(1), greedy)
  np.testing.assert_array_equal(out.tokens, np.repeat(alone.tokens, 2, axis=0))
  np.testing.assert_allclose(out.logprobs, np.repeat(alone.logprobs, 2, axis=0), atol=2e-5)


def test_a_snapshot_decodes_as_its_params_after_they_are_donated():
  """Engine.snapshot holds the weights apart: the params it came from may be updated in
  place (a train step donates them) while a generate call reads it (rl.max_staleness)."""
  cfg = small_model(dtype="float32", param_dtype="float32", vocab_size=64, max_seq_len=64)
  params = model.init(cfg, jax.random.PRNGKey(0))
  engine = generate.Engine(cfg, eos_id=3)
  sampling = generate.Sampling(max_new_tokens=8, temperature=1.0)
  want = engine.generate(params, PROMPTS, jax.random.PRNGKey(1), sampling)
  snapshot = engine.snapshot(params)
  updated = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  got = engine.generate(snapshot, PROMPTS, jax.random.PRNGKey(1), sampling)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.logprobs, want.logprobs)
  assert not np.array_equal(engine.generate(updated, PROMPTS, jax.random.PRNGKey(1),
                                            sampling).logprobs, want.logprobs)
  # With LoRA: the adapters are copied, their scale and dropout kept as they are.
  from jaxlm import lora as lora_lib
  lcfg = small_config(**{"lora.rank": 2}).lora
  adapters = jax.tree.map(lambda x: x + 0.01, lora_lib.init(cfg, lcfg, jax.random.PRNGKey(2)))
  lora = lora_lib.as_model_lora(adapters, lcfg)
  want = engine.generate(updated, PROMPTS, jax.random.PRNGKey(1), sampling, lora=lora)
  got = engine.generate(engine.snapshot(updated, lora), PROMPTS, jax.random.PRNGKey(1), sampling)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.logprobs, want.logprobs)


def test_stop_sequences_end_each_row_and_rows_share_one_program():
  cfg = small_model(dtype="float32", vocab_size=64)
  params = model.init(cfg, jax.random.PRNGKey(0))
  engine = generate.Engine(cfg, eos_id=3)
  free = engine.generate(params, PROMPTS, jax.random.PRNGKey(1),
                         generate.Sampling(max_new_tokens=10, temperature=0.0))
  stop = tuple(int(t) for t in free.tokens[0, 2:4])  # greedy is deterministic: it recurs
  out = engine.generate(params, PROMPTS, jax.random.PRNGKey(1),
                        generate.Sampling(max_new_tokens=10, temperature=0.0, stop=(stop,)))
  assert out.finished[0] and out.lengths[0] == 4
  assert tuple(out.tokens[0, 2:4]) == stop and (out.tokens[0, 4:] == 0).all()
  # Another batch of the same bucket reuses the compiled program; a longer prompt bucket
  # is a second one.
  sampling = generate.Sampling(max_new_tokens=10, temperature=0.0, stop=(stop,))
  engine.generate(params, PROMPTS[::-1], jax.random.PRNGKey(2), sampling)
  def programs():  # compiled decode loops of this sampling
    return sum(fn._cache_size() for key, fn in engine._compiled.items()  # pylint: disable=protected-access
               if key[0] == "decode" and ("sampling", sampling) in key)
  assert programs() == 1
  engine.generate(params, [np.arange(2, 30)], jax.random.PRNGKey(2), sampling)
  assert programs() == 2


def test_gpt2_positions_past_max_seq_len_are_an_error():
  cfg = small_model(dtype="float32", vocab_size=64, family="gpt2", max_seq_len=24)
  params = model.init(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="max_seq_len=24"):
    generate.Engine(cfg, eos_id=3).generate(params, PROMPTS, jax.random.PRNGKey(0),
                                            generate.Sampling(max_new_tokens=12))


def test_top_k_and_top_p_keep_only_the_head():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert np.isfinite(generate.filter_logits(logits, 2, 1.0)).tolist() == [[1, 1, 0, 0]]
  assert np.isfinite(generate.filter_logits(logits, 0, 0.7)).tolist() == [[1, 1, 0, 0]]
  assert np.isfinite(generate.filter_logits(logits, 0, 0.85)).tolist() == [[1, 1, 1, 0]]


def test_sample_cli_continues_text_from_a_run(tmp_path):
  from jaxlm import tasks
  tasks.run(small_config(**{"steps": 2, "eval_every": 0, "checkpoint_every": 2}),
            str(tmp_path / "run"))
  result = subprocess.run(
      [sys.executable, "tools/sample.py", "--model", str(tmp_path / "run"), "--prompt",
       "import os", "--prompt", "def f(", "--max_new_tokens", "8", "--temperature", "0"],
      capture_output=True, text=True, check=True, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = result.stdout.split("---\n")
  assert lines[0].startswith("import os") and lines[1].startswith("def f("), result.stdout
  assert len(lines[0].strip()) > len("import os") and len(lines[1].strip()) > len("def f(")


def test_a_hugging_face_directory_samples_like_its_run(tmp_path):
  """policy.load reads an exported HF directory; greedy completions equal the run's."""
  from jaxlm import runs, tasks
  tasks.run(small_config(**{"steps": 2, "eval_every": 0, "checkpoint_every": 2,
                            "model.dtype": "float32"}), str(tmp_path / "run"))
  runs.export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  outs = []
  for path in (tmp_path / "run", tmp_path / "hf"):
    policy = runs.load_lm(str(path))
    engine = generate.Engine(policy.model_config, eos_id=policy.tokenizer.eos_id,
                             vocab_size=policy.tokenizer.vocab_size)
    ids = np.asarray([policy.tokenizer.bos_id] + policy.tokenizer.encode("import os"), np.int32)
    outs.append(engine.generate(policy.params, [ids], jax.random.PRNGKey(0),
                                generate.Sampling(max_new_tokens=6, temperature=0.0)).tokens)
  np.testing.assert_array_equal(outs[0], outs[1])
