import filecmp
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import small_config
from jaxlm import checkpoint, model, runs, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def run(workdir, **overrides):
  base = {"optimizer.schedule": "constant", "steps": STEPS}
  base.update(overrides)
  return tasks.run(small_config(**base), str(workdir))


def restored_params(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
  step = ckpt.latest_step()
  cfg = json.load(open(os.path.join(workdir, "config.json")))["model"]
  from jaxlm.config import model_config
  m = model_config("tiny", **{k: v for k, v in cfg.items()})
  like = jax.eval_shape(lambda r: model.init(m, r), jax.random.PRNGKey(0))
  return step, runs.load_params(workdir, like)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run(workdir)
  return workdir


def test_tiny_run_learns_and_writes_its_outputs(uninterrupted):
  records = read_metrics(uninterrupted)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
    assert key in train[-1]
  assert all(r["tokens_per_s"] is None or r["tokens_per_s"] > 0 for r in train)
  assert train[-1]["tokens_per_s"] > 0
  assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:3]]) - 1.0
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [10, 20, 30]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_nll"]), rel=1e-6)
  config = json.load(open(os.path.join(uninterrupted, "config.json")))
  assert config["task"] == "pretrain" and config["model"]["vocab_size"] == 512
  assert glob.glob(os.path.join(uninterrupted, "tensorboard", "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == ["10", "20", "30"]
  assert os.path.exists(os.path.join(uninterrupted, "tokenizer.model"))


def test_resumed_run_reproduces_every_step_exactly(uninterrupted, tmp_path):
  run(tmp_path, steps=STEPS // 2 + 3)  # stops after a checkpoint at 10, logs 11..18 too
  first = train_losses(tmp_path)
  assert max(first) == STEPS // 2 + 3
  # The same command again, with the full length: resumes from step 18's final checkpoint.
  run(tmp_path)
  expected = train_losses(uninterrupted)
  assert train_losses(tmp_path) == expected  # bit-for-bit, every step
  step_a, params_a = restored_params(uninterrupted)
  step_b, params_b = restored_params(tmp_path)
  assert step_a == step_b == STEPS
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_eval_on_start_evaluates_the_initial_params_once(uninterrupted, tmp_path):
  run(tmp_path, steps=15, eval_on_start=True)  # checkpoint at 10; ends with an eval at 15
  run(tmp_path, eval_on_start=True)            # resumed: step 0 is not evaluated again
  evals = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 10, 15, 20, 30]
  first = [r for r in read_metrics(uninterrupted) if "eval_loss" in r][0]
  assert evals[1]["eval_loss"] == first["eval_loss"]  # the training is the same
  assert evals[0]["eval_loss"] > evals[1]["eval_loss"] + 0.5  # random init: near log(512)
  assert train_losses(tmp_path) == train_losses(uninterrupted)


def test_inspect_checkpoint_tool_lists_steps_and_params(uninterrupted):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_checkpoint.py"),
                        str(uninterrupted)], capture_output=True, text=True, check=True).stdout
  assert "steps 10, 20, 30" in out and "step 30:" in out
  assert "['layers']['wq']" in out and "2x64x4x16" in out
  n_params = sum(int(x.size) for x in jax.tree.leaves(restored_params(uninterrupted)[1]))
  assert f"{n_params:,} parameters" in out


def test_resume_on_another_mesh_continues_the_run(uninterrupted, tmp_path):
  run(tmp_path, steps=13)  # mesh 1x8x1 (fsdp fills the devices)
  run(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  expected, got = train_losses(uninterrupted), train_losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(14, STEPS + 1):  # other reduction order: equal to bf16 precision
    assert got[step] == pytest.approx(expected[step], rel=2e-2), step


def test_init_from_starts_from_the_checkpoint(uninterrupted, tmp_path):
  run(tmp_path, steps=2, init_from=str(uninterrupted))
  # The source run's tokenizer is used, and kept in the new workdir for what follows.
  assert filecmp.cmp(os.path.join(tmp_path, "tokenizer.model"),
                     os.path.join(uninterrupted, "tokenizer.model"), shallow=False)
  fresh_first = train_losses(uninterrupted)[1]
  continued_first = train_losses(tmp_path)[1]
  assert continued_first < fresh_first - 1.0


def test_progress_bar_on_a_fresh_start_and_a_resume(tmp_path):
  from jaxlm.metrics import MetricsWriter  # pylint: disable=import-outside-toplevel
  for start in (None, 2):  # None: no checkpoint yet
    log = MetricsWriter(str(tmp_path), total_steps=4, start_step=start, progress="bar")
    log.write(3, {"loss": 1.0})
    log.advance(3)
    log.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [3]  # resumed at 2: step 3 once
