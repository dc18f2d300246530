"""Several processes, proven on one machine: 2 processes x 4 CPU devices train exactly as
1 process x 8 devices (the default data.shards fixes the global batches), a run killed
on every process resumes from its last checkpoint with the same losses, on 2 processes or
(slow) on 1, and GRPO's rollouts and updates on 2 x 4 are those of 1 x 8."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config.steps=6", "--config.log_every=1", "--config.eval_every=0",
        "--config.checkpoint_every=3", "--config.progress=log",
        "--config.async_checkpointing=False", "--config.data.tokenizer_vocab_size=512",
        "--config.data.tokenizer_sample_chars=300000", "--config.data.prefetch=0"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, devices, *extra, process=None, port=None, config="configs/pretrain_tiny.py",
          args=ARGS):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  if process is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process))
  cmd = [sys.executable, "-m", "jaxlm.launch", "--config", config, "--workdir", str(workdir),
         *args, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=600):
  """Wait for every process; when one fails, stop the others (processes of one run would
  wait for it at their next collective until the timeout) and show its output."""
  outputs = {}
  readers = [threading.Thread(target=lambda p=p: outputs.__setitem__(p, p.communicate()[0]))
             for p in procs]
  for r in readers:
    r.start()
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  stopped = [p for p in procs if p.poll() is None]
  for p in stopped:
    p.kill()
  for r in readers:
    r.join()
  for p in sorted(procs, key=lambda p: p in stopped):  # the one that failed first
    assert p.returncode == 0, outputs[p][-3000:]


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """A 1 x 8 reference run, and a 2 x 4 run of the same config killed after step 4."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one", root / "two"
  finish([start(one, 8)])
  reference = losses(one)
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]

  # Both processes, killed (SIGKILL: nothing saved on the way out) once step 4 is logged;
  # the synchronous checkpoint at step 3 is then complete.
  tok = f"--config.data.tokenizer={one / 'tokenizer.model'}"
  port = free_port()
  procs = [start(two, 4, tok, process=i, port=port) for i in range(2)]
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.exists(two / "metrics.jsonl") and 4 in losses(two):
      break
    assert all(p.poll() is None for p in procs), "a process ended before it was killed"
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert os.path.isdir(two / "checkpoints" / "3")
  return {"reference": reference, "workdir": two, "before_kill": losses(two), "tok": tok,
          "one": one}


def check_resumed(after, killed):
  assert sorted(after) == [1, 2, 3, 4, 5, 6]
  for step in range(4, 7):  # the resumed steps repeat what the killed run computed
    if step in killed["before_kill"]:
      assert after[step] == pytest.approx(killed["before_kill"][step], rel=1e-4)
  # Same batches on 2 x 4 as on 1 x 8; only the order of the cross-process sums differs
  # (successive steps' losses differ by 3e-4 of their size and more).
  for step in range(1, 7):
    assert after[step] == pytest.approx(killed["reference"][step], rel=1e-4)


def test_two_processes_train_as_one_and_resume_exactly_after_a_kill(tmp_path, killed):
  two = tmp_path / "two"
  shutil.copytree(killed["workdir"], two)
  port = free_port()
  finish([start(two, 4, killed["tok"], process=i, port=port) for i in range(2)])
  after = losses(two)
  check_resumed(after, killed)
  for step in range(4, 7):  # on the same processes, exactly
    if step in killed["before_kill"]:
      assert after[step] == killed["before_kill"][step]


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one(tmp_path, killed):
  one = tmp_path / "one"
  shutil.copytree(killed["workdir"], one)
  finish([start(one, 8, killed["tok"])])
  check_resumed(losses(one), killed)


def test_grpo_on_two_processes_rolls_out_and_learns_as_on_one(tmp_path, killed):
  """Every process makes the whole rollout batch (the same prompts in the same order,
  the same sampling keys), so 2 x 4 samples the same completions as 1 x 8 and takes the
  same steps (up to the order of cross-process sums)."""
  args = [f"--config.init_from={killed['one']}", "--config.steps=2", "--config.log_every=1",
          "--config.checkpoint_every=2", "--config.async_checkpointing=False",
          "--config.progress=log", "--config.rl.max_new_tokens=8"]
  one, two = tmp_path / "one", tmp_path / "two"
  port = free_port()  # the 1 x 8 run and the two processes at once: CI's time
  finish([start(one, 8, config="configs/grpo_tiny.py", args=args)]
         + [start(two, 4, process=i, port=port, config="configs/grpo_tiny.py", args=args)
            for i in range(2)])
  def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      return [r for r in map(json.loads, f) if "loss" in r]
  a, b = records(one), records(two)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  for x, y in zip(a, b):  # the same completions: their rewards and lengths, exactly
    for key in ("reward", "reward_std", "completion_length", "val/num_eos_tokens"):
      assert x[key] == y[key], (x["step"], key)
  # Step 1 starts from the same weights: the same loss, gradient and KL.
  for key in ("loss", "grad_norm", "objective/kl"):
    assert b[0][key] == pytest.approx(a[0][key], rel=1e-4, abs=1e-8), key
  # Step 2 starts from weights one Adam update on, whose cross-process sums round
  # differently (Adam's normalization magnifies that in near-zero gradient entries). Its
  # surrogate loss is then noise: the group-centred advantages sum to zero, so what is
  # left is the advantage-weighted mismatch between the engine's and the trainer's
  # log-probs (about 1e-5 here, against per-token terms of order 1). The gradient and
  # the KL stay well conditioned.
  assert b[1]["grad_norm"] == pytest.approx(a[1]["grad_norm"], rel=1e-3)
  assert b[1]["objective/kl"] == pytest.approx(a[1]["objective/kl"], rel=1e-2)
  assert abs(b[1]["loss"] - a[1]["loss"]) < 1e-5
  assert a[0]["reward_std"] > 0  # the samples differ, so equal rewards are not trivial
