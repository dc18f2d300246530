"""Test set-up: 8 fake CPU devices for every sharding claim, and small shared configs."""

import os
import sysconfig

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxlm.config import base_config, model_config  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def small_model(**overrides):
  m = model_config("tiny", d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                   vocab_size=512, remat="none")
  for k, v in overrides.items():
    setattr(m, k, v)
  return m


def small_config(workdir_files=None, **overrides):
  """A pretraining config that runs in seconds on CPU."""
  c = base_config()
  c.model = small_model(vocab_size=0)
  c.steps = 20
  c.log_every = 1
  c.eval_every = 10
  c.eval_steps = 1
  c.checkpoint_every = 10
  c.async_checkpointing = False
  c.progress = "log"
  c.data.train = f"{STDLIB}/[a-f]*.py"
  c.data.eval = f"{STDLIB}/json/*.py"
  c.data.tokenizer_vocab_size = 512
  c.data.tokenizer_sample_chars = 300_000
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.prefetch = 0
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 5
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  c.lock()
  return c


@pytest.fixture
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data is absent")
  return SHARED_DATA
