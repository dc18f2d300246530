"""Non-finite losses and gradients (nan_policy), and loss spikes, injected into a real
pretraining run by poisoning its loss on some batches."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from jaxlm import loop, tasks


def poison(monkeypatch, factor, every_batch=False):
  """Multiply the loss (and so the gradients) by `factor` on the batches whose token sum
  is divisible by 3 (about a third of them), or on every batch."""
  train = loop.train

  def poisoned_train(config, workdir, task, sharder):
    loss_fn = task.loss_fn

    def poisoned(params, batch, rng, frozen):
      objective, sums = loss_fn(params, batch, rng, frozen)
      hit = every_batch | (jnp.sum(batch["tokens"]) % 3 == 0)
      scale = jnp.where(hit, factor, 1.0)
      return objective * scale, {**sums, "loss": sums["loss"] * scale}
    task.loss_fn = poisoned
    return train(config, workdir, task, sharder)

  monkeypatch.setattr(loop, "train", poisoned_train)


def run(workdir, **overrides):
  base = {"steps": 12, "eval_every": 0, "checkpoint_every": 100}
  base.update(overrides)
  return tasks.run(small_config(**base), str(workdir))


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_skip_policy_skips_each_non_finite_update_and_counts_it(tmp_path, monkeypatch, capsys):
  poison(monkeypatch, jnp.nan)
  run(tmp_path, nan_policy="skip", max_skipped_steps=3)
  train = [r for r in records(tmp_path) if "loss" in r]
  skipped = [r["step"] for r in train if r["loss"] is None]  # non-finite losses log as null
  assert 0 < len(skipped) < len(train)
  assert train[-1]["skipped_steps"] == len(skipped)
  said = [line for line in capsys.readouterr().out.splitlines() if "update skipped" in line]
  assert [int(line.split()[1].rstrip(":")) for line in said] == skipped
  # The skipped updates left no trace: every other step trained on finite weights.
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
             for r in train if r["step"] not in skipped)


def test_stop_policy_stops_naming_the_step_and_gradient_after_a_dump(tmp_path, monkeypatch):
  poison(monkeypatch, jnp.nan, every_batch=True)
  with pytest.raises(loop.TrainingError) as e:
    run(tmp_path)  # nan_policy "stop" is the default
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("step 1: non-finite loss (nan) or gradients, first non-finite "
                            "gradient ['")
  assert "stopped (nan_policy=stop)" in message
  dump = tmp_path / "nonfinite" / "step_1"
  assert str(dump) in message
  report = json.loads((dump / "report.json").read_text())
  assert report["step"] == 1 and report["loss"] is None
  assert report["first_nonfinite_gradient"] in message
  assert report["nonfinite_parameters"] == []  # the update was skipped
  batch = np.load(dump / "batch_p0.npz")
  assert batch["tokens"].shape == (8, 32)
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))  # nothing non-finite saved


@pytest.mark.slow
def test_too_many_skips_in_a_row_stop_the_run(tmp_path, monkeypatch):
  poison(monkeypatch, jnp.inf, every_batch=True)
  with pytest.raises(loop.TrainingError, match=r"^step 3: .*stopped \(3 skipped updates in a "
                     r"row, over max_skipped_steps=2\)"):
    run(tmp_path, nan_policy="skip", max_skipped_steps=2)


def test_loss_spikes_are_logged_as_events(tmp_path, monkeypatch, capsys):
  """5x the loss on a third of the batches: spikes (over 3x the mean), not a divergence
  (9x), so the run (nan_policy="stop", the default) goes on and checkpoints."""
  poison(monkeypatch, 5.0)
  run(tmp_path, steps=16, loss_spike_factor=3.0, checkpoint_every=4,
      **{"optimizer.grad_clip": 1.0})
  rs = records(tmp_path)
  steps = [r["step"] for r in rs if "loss" in r]
  spikes = [r["step"] for r in rs if "loss" in r and r["loss"] > 15]  # the poisoned steps
  events = [r["step"] for r in rs if "event/loss_spike" in r]
  # Every poisoned step after the first logged one (the mean needs a loss), and no other
  # step; a detected spike does not enter the mean, an undetected one does.
  want, in_mean = [], 0
  for step in steps:
    if step in spikes and in_mean >= 1:
      want.append(step)
    else:
      in_mean += 1
  assert len(want) >= 2 and events == want
  out = capsys.readouterr().out
  assert sum("loss spike" in line for line in out.splitlines()) == len(events)
  # keep_checkpoints=3
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [
      8, 12, 16]


def test_a_divergence_in_the_first_logged_step_stops_before_it_is_checkpointed(tmp_path):
  """lr=3 without clipping: the loss is ~13x its first value at step 4, the first logged
  step. The window starts with step 1's loss, so that is a spike, and under nan_policy=stop
  the run ends there instead of checkpointing the dead model."""
  with pytest.raises(loop.TrainingError, match=r"^step 4: the loss diverged at step 4 .*"
                     r"stopped before checkpointing it \(nan_policy=stop\); no checkpoint"):
    run(tmp_path, steps=8, log_every=4, checkpoint_every=4,
        **{"optimizer.lr": 3.0, "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0})
  rs = records(tmp_path)
  assert [r["step"] for r in rs if "initial_loss" in r] == [1]
  assert [r["step"] for r in rs if "event/loss_spike" in r] == [4]
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
