"""Damaged checkpoints and a full disk: resume passes over a checkpoint it cannot read
(saying so in one line, moving it aside, never deleting it) and continues from the
newest intact one exactly; a write that fails leaves the previous checkpoint intact."""

import json
import os
import resource
import signal

import jax
import numpy as np
import pytest

from conftest import small_config
from jaxlm import checkpoint, tasks

STEPS = 8


def run(workdir, **overrides):
  base = {"optimizer.schedule": "constant", "steps": STEPS, "checkpoint_every": 2,
          "keep_checkpoints": 10, "eval_every": 0}
  base.update(overrides)
  return tasks.run(small_config(**base), str(workdir))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def params(workdir):
  from test_train import restored_params  # pylint: disable=import-outside-toplevel
  return restored_params(workdir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run(workdir)
  return workdir


def truncate_largest_file(ckpts):
  files = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "6" / "params") for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return 6


def missing_manifest(ckpts):
  os.remove(ckpts / "6" / "params" / "manifest.ocdbt")
  return 6


def missing_data_position(ckpts):
  os.remove(ckpts / "6" / "data" / "metadata")
  return 6


def empty_step_directory(ckpts):
  os.mkdir(ckpts / "7")
  return 7


@pytest.mark.parametrize("damage", [
    truncated_array_file := truncate_largest_file,
    pytest.param(missing_manifest, marks=pytest.mark.slow),
    pytest.param(missing_data_position, marks=pytest.mark.slow),
    pytest.param(empty_step_directory, marks=pytest.mark.slow),
], ids=lambda f: f.__name__)
def test_resume_passes_over_a_damaged_checkpoint(tmp_path, uninterrupted, damage, capsys):
  run(tmp_path, steps=6)  # checkpoints 2, 4, 6
  ckpts = tmp_path / "checkpoints"
  bad = damage(ckpts)
  good = 4 if bad == 6 else 6
  capsys.readouterr()
  run(tmp_path)
  out = capsys.readouterr().out
  said = [line for line in out.splitlines() if "is unreadable" in line]
  assert len(said) == 1, out
  assert f"{ckpts}/{bad} is unreadable (" in said[0] and f"trying step {good}" in said[0]
  assert f"resumed from {ckpts}/{good}" in out
  assert (ckpts / f"{bad}.unreadable").is_dir()  # moved aside, kept for a look, not deleted
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4, 6, 8]
  assert losses(tmp_path) == losses(uninterrupted)
  jax.tree.map(np.testing.assert_array_equal, params(tmp_path)[1], params(uninterrupted)[1])


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_error_and_nothing_is_moved(tmp_path):
  run(tmp_path, steps=4)
  ckpts = tmp_path / "checkpoints"
  for step in (2, 4):
    os.remove(ckpts / str(step) / "params" / "manifest.ocdbt")
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint under .* restores; the "
                     r"newest, step 4: ") as e:
    run(tmp_path)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(ckpts)) == ["2", "4"]


def test_a_full_disk_fails_the_write_in_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, uninterrupted, monkeypatch):
  """The third save runs with files capped at 64 KiB (RLIMIT_FSIZE: writes past it fail
  as on a full disk); the checkpoint is written asynchronously, so its failure shows at
  the next wait."""
  save = checkpoint.Checkpointer.save
  calls = []

  def cramped_save(self, step, state, data_state):
    calls.append(step)
    if len(calls) != 3:
      return save(self, step, state, data_state)
    self.wait()  # the previous (asynchronous) write completes with room to spare
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
      save(self, step, state, data_state)
      self.wait()
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
      signal.signal(signal.SIGXFSZ, previous)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", cramped_save)
  with pytest.raises(checkpoint.CheckpointError) as e:
    run(tmp_path, async_checkpointing=True)
  message = str(e.value)
  assert "\n" not in message
  assert "writing checkpoint" in message and "/6 failed" in message
  assert "step 4 is the newest complete one, kept as it was" in message
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4]
  # The disk has room again: the same command resumes from step 4 and finishes the run
  # exactly as one that never failed.
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  run(tmp_path)
  assert losses(tmp_path) == losses(uninterrupted)
  assert not [d for d in os.listdir(ckpts) if "tmp" in d]


def test_a_full_disk_under_the_launcher_is_one_line_on_stderr(tmp_path):
  """The launcher itself, with files capped at 64 KiB from the start (so the first
  checkpoint cannot be written): orbax's thread tracebacks and the late "Event loop is
  closed" errors stay out of the terminal, one line says what failed, and it exits 1."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import STDLIB  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  launcher = " ".join([
      sys.executable, "-m", "jaxlm.launch", "--config", "configs/pretrain_tiny.py",
      "--workdir", str(tmp_path / "run"), "--config.steps=1", "--config.eval_every=0",
      "--config.data.eval=", "--config.data.tokenizer_vocab_size=512",
      "--config.data.tokenizer_sample_chars=50000", f"'--config.data.train={STDLIB}/[a-b]*.py'",
      "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.model.d_model=32",
      "--config.model.num_layers=1", "--config.model.ffn_dim=64"])
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # SIGXFSZ ignored (inherited), then files capped at 64 KiB
  out = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 64; exec {launcher}"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
  assert out.stderr.startswith(f"error: writing checkpoint {tmp_path / 'run'}/checkpoints/1 "
                               f"failed (")
  assert "File too large" in out.stderr and "none is complete" in out.stderr
