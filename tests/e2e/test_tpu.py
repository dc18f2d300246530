"""Cloud TPU jobs and the SLURM template, checked by their dry runs: the exact gcloud
commands, every worker addressed, one job per sweep trial, nothing run."""

import os
import subprocess
import sys

import pytest

from jaxlm import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(*args):
  return subprocess.run([sys.executable, "-m", "jaxlm.launch", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=120, check=False)


def test_a_spot_slice_launch_prints_every_gcloud_command_in_order():
  p = launch("--config", "configs/pretrain_llama.py:preset=llama_150m", "--workdir",
             "gs://bkt/runs/l150", "--tpu", "my-v5p", "--zone", "us-east5-a", "--accelerator",
             "v5p-64", "--spot", "--dry_run", "--config.data.train=/gcs/bkt/corpus/*.jsonl",
             "--config.data.batch_size=64")
  assert p.returncode == 0, p.stderr[-2000:]
  cmds = [line for line in p.stdout.splitlines() if not line.startswith("#")]
  assert cmds[0] == ("gcloud compute tpus queued-resources create my-v5p --node-id=my-v5p "
                     "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 "
                     "--zone=us-east5-a --spot")
  assert cmds[1].startswith("gcloud compute tpus queued-resources describe my-v5p")
  assert cmds[2].startswith("sh -c ") and "git ls-files" in cmds[2]
  assert cmds[3].startswith("gcloud compute tpus tpu-vm scp /tmp/jaxlm-my-v5p.tar.gz")
  ssh = [c for c in cmds if " tpu-vm ssh " in c]
  assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)  # unpack, setup, run
  assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in ssh[1] and "jax[tpu]" in ssh[1]
  run = ssh[2]
  assert "JAXLM_DISTRIBUTED=auto nohup ~/jaxlm-venv/bin/python -m jaxlm.launch" in run
  assert "--config configs/pretrain_llama.py:preset=llama_150m" in run
  assert "--workdir /gcs/bkt/runs/l150" in run and "--config.data.batch_size=64" in run


def test_a_sweep_on_tpu_is_one_job_per_trial():
  p = launch("--config", "configs/pretrain_tiny.py", "--sweep", "--workdir", "gs://bkt/sw",
             "--tpu", "t", "--zone", "us-east5-a", "--accelerator", "v6e-8", "--dry_run",
             "--tpu_action=run")
  assert p.returncode == 0, p.stderr[-2000:]
  runs = [line for line in p.stdout.splitlines() if " tpu-vm ssh " in line]
  assert len(runs) == 3
  for i, (line, lr) in enumerate(zip(runs, ("0.001", "0.003", "0.01"))):
    assert line.startswith(f"gcloud compute tpus tpu-vm ssh t-{i} --worker=all ")
    assert f"--workdir /gcs/bkt/sw/optimizer.lr={lr} " in line
    assert f"--config.optimizer.lr={lr} " in line


def test_watch_recreates_a_preempted_slice_and_reruns(capsys):
  job = tpu.Job(name="j", zone="us-east5-a", accelerator="v5litepod-16", config="c.py",
                workdir="/w")
  tpu.perform(job, "watch", tpu.Runner(dry_run=True), ROOT)
  out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
  expected = [
      "gcloud compute tpus queued-resources describe j ",
      "gcloud compute tpus tpu-vm ssh j --worker=0 ",       # the run's exit status, if any
      "gcloud compute tpus queued-resources delete j ",
      "gcloud compute tpus queued-resources create j ",
      "gcloud compute tpus queued-resources describe j ",
      f"sh -c 'cd {ROOT} && git ls-files",
      "gcloud compute tpus tpu-vm scp /tmp/jaxlm-j.tar.gz ",
      "gcloud compute tpus tpu-vm ssh j --worker=all '--command=rm -rf ~/jaxlm",
      "gcloud compute tpus tpu-vm ssh j --worker=all '--command=python3 -m venv",
      "gcloud compute tpus tpu-vm ssh j --worker=all '--command=rm -f ~/jaxlm.exit"]
  assert len(out) == len(expected)
  for line, prefix in zip(out, expected):
    assert line.startswith(prefix), (line, prefix)


@pytest.mark.parametrize("args, message", [
    (["--tpu", "t", "--zone", "z", "--accelerator", "v9x"], "--accelerator='v9x': expected"),
    (["--tpu", "t", "--accelerator", "v6e-8"], "--tpu, --zone and --accelerator are all needed"),
    ([], "gs:// workdirs are for Cloud TPU jobs (--tpu)"),
])
def test_bad_tpu_settings_are_one_line(args, message):
  p = launch("--config", "configs/pretrain_tiny.py", "--workdir", "gs://bkt/r", "--dry_run",
             *args)
  assert p.returncode == 2
  assert message in p.stderr.strip().splitlines()[-1]
  assert "Traceback" not in p.stderr and "gcloud" not in p.stdout  # nothing was built


def test_slice_devices_and_the_slurm_template():
  assert [tpu.slice_devices(a) for a in ("v5p-64", "v4-32", "v5litepod-16", "v6e-8")] == \
      [32, 16, 16, 8]
  path = os.path.join(ROOT, "launch", "slurm.sbatch")
  assert subprocess.run(["bash", "-n", path], check=False).returncode == 0
  text = open(path, encoding="utf-8").read()
  assert "srun" in text and "python -m jaxlm.launch" in text and "--signal=TERM@120" in text
  usage = subprocess.run(["bash", path], capture_output=True, text=True, check=False)
  assert usage.returncode == 2 and usage.stderr.startswith("usage: sbatch")
