"""SIGTERM (a preemption notice): the run writes a checkpoint within the grace period,
exits 0, and the same command later continues from it."""

import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def launch(workdir, steps):
  args = [sys.executable, "-m", "jaxlm.launch", "--config",
          os.path.join(ROOT, "configs", "pretrain_tiny.py"), "--workdir", str(workdir),
          f"--config.steps={steps}", "--config.eval_every=0", "--config.checkpoint_every=1000",
          "--config.log_every=1", "--config.progress=log", "--config.model.d_model=32",
          "--config.model.num_layers=1", "--config.model.ffn_dim=64", "--config.data.seq_len=16",
          "--config.data.batch_size=8", "--config.data.tokenizer_vocab_size=512",
          "--config.data.tokenizer_sample_chars=100000", "--config.preemption_grace_s=20"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT)


def train_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def trained_a_step(workdir) -> bool:
  """Whether metrics.jsonl holds a step's loss yet. Its first record (the data counts) is
  written before the first step compiles; a signal then would time the compile too."""
  try:
    return bool(train_steps(workdir))
  except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
    return False


def test_sigterm_saves_a_checkpoint_within_the_grace_period_and_exits_zero(tmp_path):
  proc = launch(tmp_path, 400)
  deadline = time.monotonic() + 600  # only against a hang: the wait is for the first step
  while time.monotonic() < deadline and proc.poll() is None and not trained_a_step(tmp_path):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM: saving checkpoint" in out
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 400
  done = re.search(r"SIGTERM: checkpoint at step (\d+) complete ([\d.]+)s after the signal\n",
                   out)
  assert done and int(done.group(1)) == steps[0], out
  assert float(done.group(2)) <= 20  # preemption_grace_s, with no warning
  assert train_steps(tmp_path) == list(range(1, steps[0] + 1))  # every step's record kept
  # The same command, later: continues from the checkpoint to the end.
  proc = launch(tmp_path, steps[0] + 3)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert f"resumed from {tmp_path}/checkpoints/{steps[0]}" in out
  assert train_steps(tmp_path) == list(range(1, steps[0] + 4))
