import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GEMMA_LIKE, QWEN3_LIKE, small_model
from jaxlm import attention, model


def _f32(**kw):
  return small_model(dtype="float32", **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_at_t_ignore_tokens_after_t(family):
  cfg = _f32(family=family, max_seq_len=64)
  params = model.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
  t = 9
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
  a = model.forward(params, tokens, cfg)
  b = model.forward(params, changed, cfg)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_segments_do_not_see_each_other(family):
  cfg = _f32(family=family, max_seq_len=64)
  params = model.init(cfg, jax.random.PRNGKey(0))
  doc_a = jax.random.randint(jax.random.PRNGKey(1), (1, 7), 0, cfg.vocab_size)
  doc_b = jax.random.randint(jax.random.PRNGKey(2), (1, 9), 0, cfg.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 9])
  pos = jnp.array([list(range(7)) + list(range(9))])
  out = model.forward(params, packed, cfg, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(out[:, :7], model.forward(params, doc_a, cfg), atol=1e-5)
  np.testing.assert_allclose(out[:, 7:], model.forward(params, doc_b, cfg), atol=1e-5)


def test_llama3_rope_scaling_matches_reference_formula():
  cfg = _f32(rope_theta=500000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
             rope_high_freq_factor=4.0, rope_original_max_len=8192, head_dim=32)
  got = np.asarray(model.rope_frequencies(cfg), np.float64)
  inv = 1.0 / (500000.0 ** (np.arange(0, 32, 2) / 32))
  expected = []
  for f in inv:  # the published Llama 3.1 procedure, one frequency at a time
    wavelen = 2 * math.pi / f
    if wavelen < 8192 / 4.0:
      expected.append(f)
    elif wavelen > 8192 / 1.0:
      expected.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got[-1] < inv[-1] and got[0] == pytest.approx(inv[0], rel=1e-6)


@pytest.mark.parametrize("variant", [{}, GEMMA_LIKE, {**QWEN3_LIKE, "num_layers": 5}],
                         ids=["llama", "gemma_like", "qwen3_like_5_layers"])
def test_remat_policies_and_scanned_layers_give_the_same_gradients(variant):
  """Local and global layers in a pattern: scanned by its repeats (and a partial one),
  unrolled, rematerialized or not, the same gradients."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 512)

  def grads(remat, layer_loop="unroll"):
    cfg = _f32(remat=remat, layer_loop=layer_loop, **variant)
    params = model.init(cfg, jax.random.PRNGKey(0))
    return jax.jit(jax.grad(lambda p: model.forward(p, tokens, cfg).mean()))(params)

  ref = grads("none")
  for policy, scan in [("minimal", "unroll"), ("full", "unroll"), ("none", "scan"),
                       ("minimal", "scan")]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 ref, grads(policy, scan))


def test_qkv_bias_and_tied_embeddings_change_the_parameter_set():
  cfg = _f32(qkv_bias=True, tie_embeddings=True)
  params = model.init(cfg, jax.random.PRNGKey(0))
  assert "bq" in params["layers"] and "lm_head" not in params
  assert params["layers"]["wq"].shape == (2, 64, 4, 16)
  logits = model.forward(params, jnp.zeros((1, 4), jnp.int32), cfg)
  assert logits.shape == (1, 4, 512) and logits.dtype == jnp.float32


def test_compute_dtype_is_separate_from_param_dtype():
  cfg = small_model(dtype="bfloat16", param_dtype="float32")
  params = model.init(cfg, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  h = model.hidden_states(params, jnp.zeros((1, 4), jnp.int32), cfg)
  assert h.dtype == jnp.bfloat16


def test_flops_per_token_matches_palm_formula_for_tinyllama():
  from jaxlm.config import model_config
  cfg = model_config("tinyllama_1b")
  # Non-embedding weights + output projection, by hand.
  per_layer = 2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632 + 2 * 2048
  n = 22 * per_layer + 2048 + 2048 * 32000
  assert model.flops_per_token(cfg, 2048) == 6 * n + 12 * 22 * 2048 * 2048


def _qkv(B, T, H, G, K):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(keys[0], (B, T, H, K), jnp.float32),
          jax.random.normal(keys[1], (B, T, G, K), jnp.float32),
          jax.random.normal(keys[2], (B, T, G, K), jnp.float32))


@pytest.mark.parametrize("options", [attention.PLAIN,
                                     attention.Options(window=16, softcap=5.0, scale=0.05)],
                         ids=["plain", "window_softcap_scale"])
def test_splash_attention_interpret_matches_xla(options):
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  q, k, v = _qkv(1, 128, 2, 1, 128)
  seg = jnp.array([[1] * 50 + [2] * 78])
  try:
    got = attention.attend(q, k, v, seg, "splash_interpret", options)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"splash attention does not run in interpret mode here: {type(e).__name__}")
  np.testing.assert_allclose(got, attention.attend(q, k, v, seg, "xla", options), atol=2e-3)


def _naive_attention(q, k, v, window, softcap, scale):
  """float64 numpy: one query at a time, over the keys it may see."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, K = q.shape
  G = k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      lo = max(0, t - window + 1) if window else 0
      for h in range(H):
        s = k[b, lo:t + 1, h // (H // G)] @ q[b, t, h] * scale
        if softcap:
          s = softcap * np.tanh(s / softcap)
        w = np.exp(s - s.max())
        out[b, t, h] = (w / w.sum()) @ v[b, lo:t + 1, h // (H // G)]
  return out


@pytest.mark.parametrize("window,softcap,scale", [(4, 0.0, 0.0), (1, 0.0, 0.0), (6, 2.0, 0.1),
                                                  (0, 1.5, 0.0)])
def test_window_softcap_and_scale_equal_a_direct_computation(window, softcap, scale):
  B, T, H, G, K = 2, 12, 4, 2, 8
  q, k, v = _qkv(B, T, H, G, K)
  options = attention.Options(window=window, softcap=softcap, scale=scale)
  want = _naive_attention(q, k, v, window, softcap, scale or K ** -0.5)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(attention.attend(q, k, v, None, "xla", options), want, atol=1e-5)
    # The decode path: every slot valid, queries at their own slots, keys and values in
    # the cache's layout (slots after kv heads).
    cached = attention.cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                        jnp.ones((B, T), bool), jnp.arange(T), options)
    np.testing.assert_allclose(cached, want, atol=1e-5)


def test_flops_count_local_layers_over_their_window():
  cfg = _f32(sliding_window=100, layer_pattern="LLG", num_layers=3)
  plain = model.flops_per_token(_f32(num_layers=3), 1000)
  K = model.head_dim(cfg)
  assert plain - model.flops_per_token(cfg, 1000) == 12 * cfg.num_heads * K * 2 * (1000 - 100)
