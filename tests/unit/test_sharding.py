import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import GEMMA_LIKE, QWEN3_LIKE, small_config
from jaxlm import loop, losses, model, optimizer, sharding
from jaxlm.config import DEFAULT_RULES


def test_rules_first_unused_mesh_axes_win():
  assert sharding.logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES) == P(
      ("data", "fsdp"), None, None)  # fsdp already used by batch: embed is replicated
  assert sharding.logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == P("fsdp", "tensor")


def test_unmatched_logical_axis_is_an_error():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  with pytest.raises(sharding.ShardingError, match=r"\['w'\].*'experts' matches no sharding rule"):
    sharding.logical_to_sharding({"w": ("experts", "embed")}, mesh, DEFAULT_RULES)


def test_indivisible_dimension_names_the_parameter():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": -1})
  shapes = {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32)}
  with pytest.raises(sharding.ShardingError, match=r"\['w'\]: dimension 1 \(mlp=6\)"):
    sharding.logical_to_sharding({"w": ("embed", "mlp")}, mesh, DEFAULT_RULES, shapes)


def test_library_example_shards_a_user_pytree():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tree = {"w": np.ones((16, 32), np.float32), "b": np.zeros((32,), np.float32)}
  axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
  placed = sharding.place(tree, sharding.logical_to_sharding(axes, mesh, DEFAULT_RULES, tree))
  assert placed["w"].sharding.spec == P("fsdp", "tensor")
  assert placed["w"].addressable_shards[0].data.shape == (8, 16)

  @jax.jit
  def f(x):
    return sharding.constrain(x * 2, ("batch", "embed"), mesh, DEFAULT_RULES)
  y = f(jnp.ones((8, 16)))
  assert y.sharding.spec[0] == ("data", "fsdp") and y.sharding.shard_shape(y.shape) == (2, 16)


def _first_step(mesh_sizes, batch, variant):
  """Loss and gradients of one step under the given mesh, gathered to the host."""
  config = small_config(**{f"mesh.{k}": v for k, v in mesh_sizes.items()},
                        **{f"model.{k}": v for k, v in variant.items()})
  config.unlock()
  config.model.vocab_size = 512
  sharder = loop.make_sharder(config)
  cfg = config.model
  axes = model.param_axes(cfg)
  abstract = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
  shardings = sharder.tree(axes, abstract)
  params = jax.jit(lambda r: model.init(cfg, r), out_shardings=shardings)(jax.random.PRNGKey(0))

  def loss(p, b):
    logits = model.forward(p, b["tokens"], cfg, segment_ids=b["segment_ids"],
                           positions=b["positions"], sharder=sharder)
    s, _, w = losses.cross_entropy(logits, b["targets"], b["loss_mask"])
    return s / w

  b = loop.device_batch(batch, sharder)
  value, grads = jax.jit(jax.value_and_grad(loss))(params, b)
  return float(value), jax.device_get(grads)


@pytest.mark.parametrize("mesh,variant", [
    (dict(data=8, fsdp=1, tensor=1), {}), (dict(data=2, fsdp=2, tensor=2), {}),
    (dict(data=1, fsdp=4, tensor=2), {}), (dict(data=1, fsdp=4, tensor=2), GEMMA_LIKE),
    (dict(data=2, fsdp=2, tensor=2), QWEN3_LIKE)],
    ids=["dp8", "dp2_fsdp2_tp2", "fsdp4_tp2", "gemma_like_fsdp4_tp2", "qwen3_like_dp2_fsdp2_tp2"])
def test_first_step_is_the_same_on_every_mesh(mesh, variant):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, size=(8, 33)).astype(np.int32)
  seg = np.repeat(np.array([[1] * 20 + [2] * 13]), 8, axis=0).astype(np.int32)
  pos = np.concatenate([np.arange(20), np.arange(13)])[None].repeat(8, 0).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
           "positions": pos[:, :-1], "loss_mask": (seg[:, 1:] == seg[:, :-1]).astype(np.int32)}
  ref_loss, ref_grads = _single_device_step(batch, jax.devices()[:1], variant)  # 1x1x1 mesh
  loss, grads = _first_step(mesh, batch, variant)
  # bf16 compute: relative agreement at bf16 precision.
  assert loss == pytest.approx(ref_loss, rel=1e-2)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    scale = np.max(np.abs(r)) + 1e-8
    np.testing.assert_allclose(g / scale, r / scale, atol=3e-2, err_msg=jax.tree_util.keystr(path))


def _single_device_step(batch, devices, variant):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=devices)
  config = small_config(**{f"model.{k}": v for k, v in variant.items()})
  config.unlock()
  config.model.vocab_size = 512
  sharder = sharding.Sharder(mesh, config.sharding.rules)
  cfg = config.model
  params = model.init(cfg, jax.random.PRNGKey(0))
  params = sharding.place(params, sharder.tree(model.param_axes(cfg), params))

  def loss(p, b):
    logits = model.forward(p, b["tokens"], cfg, segment_ids=b["segment_ids"],
                           positions=b["positions"], sharder=sharder)
    s, _, w = losses.cross_entropy(logits, b["targets"], b["loss_mask"])
    return s / w

  value, grads = jax.jit(jax.value_and_grad(loss))(params, loop.device_batch(batch, sharder))
  return float(value), jax.device_get(grads)


def test_gradient_accumulation_equals_the_full_batch():
  config = small_config()
  config.unlock()
  config.model.vocab_size = 512
  config.model.dtype = "float32"
  sharder = loop.make_sharder(config)
  cfg = config.model
  tx, lr = optimizer.make(config.optimizer, 10)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 512, size=(8, 17)).astype(np.int32)
  mask = rng.integers(0, 2, size=(8, 16)).astype(np.int32)  # uneven tokens per microbatch
  batch = loop.device_batch({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                             "loss_mask": mask, "segment_ids": np.ones((8, 16), np.int32),
                             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}, sharder)
  from jaxlm.tasks.common import lm_loss_fn
  task = loop.Task(init_params=None, param_axes=None, loss_fn=lm_loss_fn(cfg, 0.0, sharder),
                   train_data=None)
  params = model.init(cfg, jax.random.PRNGKey(0))
  zero = jnp.zeros((), jnp.int32)
  state = {"params": params, "opt_state": tx.init(params), "step": zero,
           "rng": jax.random.PRNGKey(0), "skipped": zero, "consecutive_skips": zero}
  outs = [jax.jit(loop.make_train_step(task, tx, lr, accum, sharder))(state, None, batch)
          for accum in (1, 2, 4)]
  for new_state, m in outs[1:]:
    assert float(m["loss"]) == pytest.approx(float(outs[0][1]["loss"]), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(outs[0][1]["grad_norm"]), rel=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 new_state["params"], outs[0][0]["params"])


def test_layer_loop_auto_unrolls_only_where_each_device_holds_the_whole_weights():
  cfg = small_config().model
  shapes = {(8, 1, 1): True, (1, 8, 1): False, (1, 1, 8): False, (4, 2, 1): False}
  for (data, fsdp, tensor), unrolled in shapes.items():
    mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})
    sharder = sharding.Sharder(mesh, DEFAULT_RULES)
    assert model.unrolls_layers(cfg, sharder) is unrolled, (data, fsdp, tensor)
  assert model.unrolls_layers(cfg, None)
  cfg.layer_loop = "scan"
  assert not model.unrolls_layers(cfg, None)
  cfg.layer_loop = "unroll"
  assert model.unrolls_layers(cfg, sharding.Sharder(mesh, DEFAULT_RULES))
