"""LoRA: merged equals unmerged, it starts from the base exactly, only adapters train,
adapter-only checkpoints, and a merged export matches the unmerged model."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import small_config, small_model
from jaxlm import checkpoint, lora, model, runs, tasks
from jaxlm.config import base_config
from jaxlm.validate import config_errors as validate
from jaxlm.errors import ConfigError


def lora_cfg(rank=4, targets="(wq|wk|wv|wo|w_gate|w_up|w_down)$"):
  c = base_config().lora
  c.rank, c.targets = rank, targets
  return c


def test_merged_equals_unmerged():
  cfg = small_model(dtype="float32")
  base = model.init(cfg, jax.random.PRNGKey(0))
  lc = lora_cfg()
  adapters = lora.init(cfg, lc, jax.random.PRNGKey(1))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                          adapters)  # B = 0 at init: make the update non-trivial
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, cfg.vocab_size)
  unmerged = model.forward(base, tokens, cfg, lora=lora.as_model_lora(adapters, lc))
  merged = model.forward(lora.merge(base, adapters, lc), tokens, cfg)
  plain = model.forward(base, tokens, cfg)
  np.testing.assert_allclose(unmerged, merged, atol=2e-5)
  assert np.max(np.abs(unmerged - plain)) > 1e-2


def test_adapters_are_zero_update_at_init_and_shaped_like_their_weights():
  cfg = small_model(dtype="float32")
  lc = lora_cfg(rank=3, targets="wo|w_down")
  adapters = lora.init(cfg, lc, jax.random.PRNGKey(0))
  assert set(adapters["layers"]) == {"wo", "w_down"}
  assert adapters["layers"]["wo"]["a"].shape == (2, 4, 16, 3)   # [L, H, K, r]
  assert adapters["layers"]["wo"]["b"].shape == (2, 3, 64)      # [L, r, D]
  assert not jnp.any(adapters["layers"]["w_down"]["b"])
  axes = lora.param_axes(cfg, lc)
  assert axes["layers"]["wo"]["a"] == ("layers", "heads", "head_dim", "lora_rank")


@pytest.mark.parametrize("targets, message", [
    ("nothing_here", "matches no layer weight"),
    ("norm", "matches layers/attn_norm, which LoRA does not adapt"),
    ("(", "not a regular expression"),
])
def test_bad_targets_name_the_key(targets, message):
  with pytest.raises(ConfigError, match=f"lora.targets=.*{message}"):
    lora.targets(small_model(), lora_cfg(targets=targets))


def test_lora_needs_init_from():
  errors = validate(small_config(**{"lora.rank": 4}), 8)
  assert any("lora.rank=4 needs init_from" in e for e in errors), errors


def test_adapters_fit_a_batch_while_the_base_stays_put():
  import optax
  from jaxlm.tasks.common import lm_loss_fn
  config = small_config(**{"lora.rank": 8, "init_from": "/unused", "model.vocab_size": 512,
                           "model.dtype": "float32"})
  parts = {"init_params": lambda rng: lora.init(config.model, config.lora, rng),
           "loss_fn": lm_loss_fn(config.model, 0.0, None, config.lora)}
  base = model.init(config.model, jax.random.PRNGKey(0))
  before = jax.tree.map(np.array, base)
  adapters = parts["init_params"](jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 33), 0, 512)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((4, 32)),
           "segment_ids": jnp.ones((4, 32), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(32), (4, 32))}
  tx = optax.adam(1e-2)
  opt = tx.init(adapters)

  @jax.jit
  def step(adapters, opt):
    (loss, _), g = jax.value_and_grad(parts["loss_fn"], has_aux=True)(adapters, batch, None, base)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(adapters, updates), opt, loss / 128

  first = None
  for _ in range(40):
    adapters, opt, loss = step(adapters, opt)
    first = loss if first is None else first
  assert float(loss) < float(first) - 1.0
  jax.tree.map(np.testing.assert_array_equal, before, base)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base")
  tasks.run(small_config(**{"steps": 10, "eval_every": 0, "checkpoint_every": 10}), str(workdir))
  return workdir


def losses_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_lora_run_starts_from_the_base_and_trains_only_adapters(base_run, tmp_path):
  common = {"init_from": str(base_run), "steps": 8, "eval_every": 0, "checkpoint_every": 8,
            "optimizer.lr": 1e-2, "optimizer.warmup_steps": 0}
  tasks.run(small_config(**common), str(tmp_path / "full"))
  tasks.run(small_config(**common, **{"lora.rank": 4}), str(tmp_path / "lora"))
  full, low_rank = losses_of(tmp_path / "full"), losses_of(tmp_path / "lora")
  assert low_rank[1] == full[1]  # B = 0: the first step sees exactly the base model
  assert low_rank[2] != full[2]
  # The checkpoint holds adapters only, and their optimizer state only.
  desc = checkpoint.describe(str(tmp_path / "lora"))
  names = [name for name, _, _ in desc["params"]]
  assert names and all(("['a']" in n or "['b']" in n) for n in names)
  cfg = json.load(open(tmp_path / "lora" / "config.json"))
  m = ml_collections.ConfigDict(cfg["model"])
  lc = ml_collections.ConfigDict(cfg["lora"])
  like = jax.eval_shape(lambda r: lora.init(m, lc, r), jax.random.PRNGKey(0))
  adapters = runs.load_params(str(tmp_path / "lora"), like)
  assert all(jnp.any(ab["b"]) for ab in adapters["layers"].values())  # the adapters trained
  import orbax.checkpoint as ocp

  def opt_state_size(run):  # elements held, from the checkpoint's metadata
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.metadata(str(tmp_path / run / "checkpoints" / "8" / "opt_state")).item_metadata
    return sum(int(np.prod(m.shape)) for m in jax.tree.leaves(tree))

  assert opt_state_size("lora") < opt_state_size("full") / 10


def test_merged_export_matches_the_unmerged_model(base_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tasks.run(small_config(**{"init_from": str(base_run), "steps": 4, "eval_every": 0,
                            "lora.rank": 4, "optimizer.lr": 3e-2}), str(tmp_path / "run"))
  runs.export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  cfg = json.load(open(tmp_path / "run" / "config.json"))
  m = ml_collections.ConfigDict(cfg["model"])
  m.dtype = "float32"
  m.attention = "xla"
  lc = ml_collections.ConfigDict(cfg["lora"])
  base = runs.load_params(str(base_run), jax.eval_shape(lambda r: model.init(m, r),
                                                               jax.random.PRNGKey(0)))
  adapters = runs.load_params(str(tmp_path / "run"), jax.eval_shape(
      lambda r: lora.init(m, lc, r), jax.random.PRNGKey(0)))
  tokens = np.random.default_rng(0).integers(0, 500, size=(2, 20))
  unmerged = np.asarray(model.forward(base, jnp.asarray(tokens), m,
                                      lora=lora.as_model_lora(adapters, lc)))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  with torch.no_grad():
    theirs = exported(torch.tensor(tokens)).logits.numpy()
  assert np.max(np.abs(theirs - unmerged)) / np.max(np.abs(unmerged)) < 1e-4
