"""kill -9 at chosen and at random moments: re-running the same command resumes, and the
per-step losses and the final parameters equal an uninterrupted run's, bit for bit.

Each run is the launcher itself, in a process of its own, with the defaults a user
gets: asynchronous checkpoints and data prefetched in a background thread."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import STDLIB
from jaxlm import checkpoint, model, runs
from jaxlm.config import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STEPS = 8


def command(workdir, tokenizer=None):
  args = [sys.executable, "-m", "jaxlm.launch", "--config",
          os.path.join(ROOT, "configs", "pretrain_tiny.py"), "--workdir", str(workdir),
          f"--config.steps={STEPS}", "--config.eval_every=4", "--config.eval_steps=2",
          "--config.checkpoint_every=2", "--config.keep_checkpoints=10", "--config.log_every=1",
          "--config.progress=log", "--config.model.d_model=32", "--config.model.num_layers=2",
          "--config.model.ffn_dim=64", "--config.data.seq_len=32", "--config.data.batch_size=8",
          f"--config.data.train={STDLIB}/[a-f]*.py", f"--config.data.eval={STDLIB}/json/*.py",
          "--config.data.tokenizer_vocab_size=512", "--config.data.tokenizer_sample_chars=100000"]
  if tokenizer:
    args.append(f"--config.data.tokenizer={tokenizer}")
  return args


def launch(workdir, tokenizer=None, failpoint=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env.pop("JAXLM_FAILPOINT", None)
  if failpoint:
    env["JAXLM_FAILPOINT"] = failpoint
  return subprocess.Popen(command(workdir, tokenizer), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  return train, evals


def final_params(workdir):
  cfg = json.load(open(os.path.join(workdir, "config.json")))["model"]
  m = model_config("tiny", **cfg)
  like = jax.eval_shape(lambda r: model.init(m, r), jax.random.PRNGKey(0))
  return checkpoint.step_of(str(workdir)), runs.load_params(str(workdir), like)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  rc, out = finish(launch(workdir))
  assert rc == 0, out
  return workdir


def assert_same_run(got, want):
  assert losses(got) == losses(want)  # every step and every evaluation, exactly once
  step_a, a = final_params(got)
  step_b, b = final_params(want)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)


def killed_then_resumed(tmp_path, reference, failpoint):
  tok = os.path.join(reference, "tokenizer.model")
  rc, out = finish(launch(tmp_path, tok, failpoint))
  assert rc == -signal.SIGKILL, out
  rc, out = finish(launch(tmp_path, tok))
  assert rc == 0, out
  return out


def test_kill_during_an_asynchronous_checkpoint_write_resumes_exactly(tmp_path, reference):
  out = killed_then_resumed(tmp_path, reference, "checkpoint:4")
  # Killed with step 4's write in flight: the run resumes from step 2 or, if that write
  # had completed, from step 4; either way, as if never interrupted.
  assert "resumed from" in out
  assert_same_run(tmp_path, reference)
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]  # cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["step:3", "eval:4", "checkpoint:6", "step:8"])
def test_kill_at_each_point_resumes_exactly(tmp_path, reference, failpoint):
  killed_then_resumed(tmp_path, reference, failpoint)
  assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_kill_at_random_moments_resumes_exactly(tmp_path, reference):
  """Three SIGKILLs at random times of one run (seeded), each followed by the same
  command, then a run to the end."""
  rng = np.random.default_rng(0)
  tok = os.path.join(reference, "tokenizer.model")
  for _ in range(3):
    proc = launch(tmp_path, tok)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120  # start-up (imports, compile) is not the interesting part
    while time.time() < deadline and proc.poll() is None and not (
        metrics.exists() and metrics.stat().st_size):
      time.sleep(0.05)
    time.sleep(float(rng.uniform(0.0, 3.0)))
    proc.send_signal(signal.SIGKILL)
    finish(proc)
  rc, out = finish(launch(tmp_path, tok))
  assert rc == 0, out
  assert_same_run(tmp_path, reference)
