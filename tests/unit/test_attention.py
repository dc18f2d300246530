"""Attention kernels agree with the XLA reference on packed rows (cuDNN where a GPU is),
and the chunked loss equals the whole-batch one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from jaxlm import attention, losses, model
from jaxlm.config import model_config


def random_packing(rng, B, T, max_len):
  """Rows of contiguous segments of random lengths (ids 1, 2, ...), padding (0) at the end."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    pos, sid = 0, 1
    end = T - int(rng.integers(0, T // 4))
    while pos < end:
      n = min(int(rng.integers(1, max_len + 1)), end - pos)
      seg[b, pos:pos + n] = sid
      pos, sid = pos + n, sid + 1
  return jnp.asarray(seg)


def test_segment_runs_gives_lengths_and_offsets_per_row():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4], [5, 5, 7, 7, 7, 7, 0, 0]])
  lengths, offsets, count = attention.segment_runs(seg, 4)
  np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [2, 4, 2, -1]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1],
                                          [0, 2, 6, -1, -1]])
  np.testing.assert_array_equal(count, [4, 1, 3])


def layouts(B, T):
  """Segment ids of each cuDNN layout, named by the kernel layout_index picks for them."""
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(T // 2, T, B))
  return {
      "causal": jnp.ones((B, T), jnp.int32),
      "padded": (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.int32),
      "ragged8": random_packing(rng, B, T, T // 2),
      "ragged64": random_packing(rng, B, T, T // 12),
      "mask": random_packing(rng, B, T, 3),
  }


def test_layout_picks_the_kernel_each_batch_needs_on_host_and_device():
  for name, seg in layouts(4, 512).items():
    assert attention.LAYOUTS[int(attention.layout_index(seg))] == name
    assert attention.batch_layout(np.asarray(seg)) == name
    assert attention.batch_layout(np.asarray(seg).reshape(2, 2, 512)) == name  # DPO pairs
  mixed = jnp.concatenate([layouts(2, 512)["causal"], layouts(2, 512)["padded"]])
  assert attention.batch_layout(np.asarray(mixed)) == "padded"
  not_first = np.array([[0, 0, 1, 1]])  # padding first: not the one-then-padding layout
  assert attention.batch_layout(not_first) == "ragged8"
  with pytest.raises(ValueError, match="unknown attention layout 'ragged'"):
    with attention.fixed_layout("ragged"):
      pass


def test_the_loop_reads_the_layout_of_host_batches_and_of_device_only_batches():
  """RL rollouts exist only on the devices: their layout is read there, so their update
  step is compiled for one kernel as every other task's is (no lax.switch)."""
  from jaxlm import loop  # pylint: disable=import-outside-toplevel
  config = small_config()
  config.model.attention = "cudnn"
  for name, seg in layouts(4, 512).items():
    assert loop.attention_layout(config, {"segment_ids": np.asarray(seg)}, False) == name
    assert loop.attention_layout(config, {"segment_ids": seg}, False) == name
  config.model.attention = "xla"
  assert loop.attention_layout(config, {"segment_ids": seg}, False) is None


# On a GPU machine: JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py
@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("layout", attention.LAYOUTS)
@pytest.mark.parametrize("fixed", [False, True], ids=["switch", "fixed"])
@pytest.mark.parametrize("options", [attention.PLAIN, attention.Options(window=100, scale=0.1)],
                         ids=["plain", "window"])
def test_cudnn_attention_matches_xla_values_and_gradients(layout, fixed, options):
  """Each kernel, chosen on the device (lax.switch) or fixed while tracing (the loop's
  per-layout steps), against the XLA reference; also with a sliding window and a query
  scale (Mistral's and Gemma's local layers)."""
  B, T, H, G, K = 4, 512, 8, 2, 64
  seg = layouts(B, T)[layout]
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v = (jax.random.normal(keys[i], (B, T, n, K), jnp.bfloat16) for i, n in
             enumerate((H, G, G)))
  # Padding's own outputs are left unspecified (its loss is masked): only checked finite.
  w = jax.random.normal(keys[3], (B, T, H, K), jnp.float32) * (seg != 0)[:, :, None, None]

  def attend(q, k, v, impl):
    with attention.fixed_layout(layout if fixed and impl == "cudnn" else None):
      return attention.attend(q, k, v, seg, impl, options)

  def loss(impl):
    return lambda q, k, v: jnp.sum(attend(q, k, v, impl).astype(jnp.float32) * w)

  # Outputs and gradients element by element; not the scalar loss, a sum of a million
  # signed terms whose bf16 rounding noise (a few percent of it) would decide the test.
  got = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  out = jax.jit(attend, static_argnums=3)(q, k, v, "cudnn")
  ref = attend(q, k, v, "xla")
  keep = np.asarray(seg != 0)
  for a, b in [(out[keep], ref[keep]), *zip(got, want)]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.parametrize("tied,cap", [(False, 0.0), (True, 0.0), (False, 2.0), (True, 2.0)])
def test_chunked_and_fused_loss_equal_plain_loss_and_gradients(tied, cap):
  """With `final_softcap` too: the fused head's capped logits and tanh's derivative."""
  cfg = model_config("tiny", vocab_size=512, dtype="float32", tie_embeddings=tied,
                     final_softcap=cap)
  params = model.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 100), 0, 512)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = (jnp.arange(100) < 90)[None].astype(jnp.int32) * jnp.ones((2, 1), jnp.int32)

  def loss(p, chunk):  # float32 throughout (on a GPU, matmuls would otherwise be tf32)
    cfg.logits_chunk = chunk
    h = model.hidden_states(p, tokens, cfg)
    log_z, target_logit, correct = model.token_stats(p, h, targets, cfg)
    total, _, _ = losses.cross_entropy_from_stats(log_z, target_logit, mask, z_loss=1e-3)
    return total, correct

  # jitted, chunk static: one program each (op by op, the test took several times longer)
  loss_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  with jax.default_matmul_precision("highest"):
    (whole, c0), g0 = loss_grad(params, 0)
    # The fused head's hand-written backward equals autodiff through the full logits.
    plain = lambda p: losses.cross_entropy(model.forward(p, tokens, cfg), targets, mask, 1e-3)[0]  # noqa: E731
    want, g_plain = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(whole, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g_plain)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for chunk in (32, 33):  # 33: the last chunk is padded
      (got, c), g = loss_grad(params, chunk)
      np.testing.assert_allclose(got, whole, rtol=1e-5)
      np.testing.assert_array_equal(c, c0)
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_head_gradient_adds_chunks_in_float32(tied):
  """bf16 compute, 64 chunks: the output head's gradient is as close to a float32
  reference as the unchunked one's (adding the chunks' parts in bf16 was 4x further)."""
  B, T, D, V = 2, 1024, 64, 512
  h = jax.random.normal(jax.random.PRNGKey(0), (B, T, D)).astype(jnp.bfloat16)
  t = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, V)
  cfg = model_config("tiny", d_model=D, vocab_size=V, tie_embeddings=tied)
  params = model.init(cfg, jax.random.PRNGKey(2))
  key = "embed" if tied else "lm_head"

  def grad(chunk):
    cfg.logits_chunk = chunk
    loss = lambda p: jnp.sum(jnp.subtract(*model.token_stats(p, h, t, cfg)[:2]))  # noqa: E731
    return jax.jit(jax.grad(loss))(params)[key]

  w = params["embed"].T if tied else params["lm_head"]
  ref = jax.grad(lambda w: jnp.sum(jnp.subtract(*losses.token_stats(
      jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w, precision="highest"), t)[:2])))(w)
  ref = ref.T if tied else ref
  err = lambda g: float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))  # noqa: E731
  whole, chunked = err(grad(0)), err(grad(16))
  assert chunked < 1.5 * whole, (chunked, whole)


def test_remat_keeps_the_primitive_cudnn_attention_runs_forward():
  """`attention.saveable` matches JAX's cuDNN forward primitive by name; a rename in a JAX
  upgrade would make remat `minimal` rerun the kernel again, silently, on GPUs."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  from jax.extend.core import Primitive  # pylint: disable=import-outside-toplevel
  prims = [v for v in vars(cudnn).values() if isinstance(v, Primitive)]
  kept = [p.name for p in prims if attention.saveable(p)]
  assert kept == ["dot_product_attention_fwd_wrapper"], sorted(p.name for p in prims)
