"""Sweeps: a config's get_sweep trials, run one after another or listed with --dry_run,
and the report over the finished trial folders."""

import csv
import os
import subprocess
import sys

from conftest import STDLIB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = f'''
from jaxlm.config import base_config, model_config

def get_config(arg=None):
  c = base_config()
  c.model = model_config("tiny", d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         ffn_dim=128, remat="none")
  c.steps, c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 2, 1, 2, 1, 2
  c.async_checkpointing, c.progress = False, "log"
  c.data.train, c.data.eval = "{STDLIB}/[a-c]*.py", "{STDLIB}/json/*.py"
  c.data.tokenizer_vocab_size, c.data.tokenizer_sample_chars = 512, 100_000
  c.data.seq_len, c.data.batch_size, c.data.prefetch = 32, 8, 0
  return c

def get_sweep(arg=None):
  return {{sweep}}
'''


def launch(*args):
  return subprocess.run([sys.executable, "-m", "jaxlm.launch", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, check=False)


def test_dry_run_lists_one_command_per_trial_and_runs_nothing(tmp_path):
  p = launch("--config", "configs/pretrain_tiny.py", "--sweep", "--dry_run",
             "--workdir", str(tmp_path / "sw"), "--config.steps=50")
  assert p.returncode == 0, p.stderr[-2000:]
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 3
  for line, lr in zip(lines, ("0.001", "0.003", "0.01")):
    assert line.startswith(f"optimizer.lr={lr}: ")
    assert f"--workdir {tmp_path / 'sw'}/optimizer.lr={lr} " in line
    assert line.endswith(f"--config.steps=50 --config.optimizer.lr={lr}")
  assert not (tmp_path / "sw").exists()


def test_a_sweep_runs_skips_finished_trials_and_reports(tmp_path):
  config = tmp_path / "cfg.py"
  config.write_text(CONFIG.replace("{sweep}", '[{"name": "slow", "optimizer.lr": 1e-4}, '
                                   '{"name": "fast", "optimizer.lr": 1e-2}]'))
  sw = tmp_path / "sw"
  p = launch("--config", str(config), "--sweep", "--workdir", str(sw))
  assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
  assert (sw / "slow" / "summary.json").exists() and (sw / "fast" / "summary.json").exists()
  again = launch("--config", str(config), "--sweep", "--workdir", str(sw))
  assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2

  r = subprocess.run([sys.executable, "tools/sweep_report.py", str(sw), "--metric=eval_loss"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| 1 | fast | optimizer.lr=0.01 | 2 | yes |" in r.stdout  # the higher rate learns more
  assert "| 2 | slow | optimizer.lr=0.0001 | 2 | yes |" in r.stdout
  with open(sw / "sweep_report.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [row["trial"] for row in rows] == ["fast", "slow"]
  assert float(rows[0]["best_eval_loss"]) < float(rows[1]["best_eval_loss"])
  assert (sw / "sweep_report.png").stat().st_size > 1000


def test_a_bad_trial_is_one_line_before_anything_runs(tmp_path):
  config = tmp_path / "cfg.py"
  config.write_text(CONFIG.replace("{sweep}", '[{"optimizer.lr": 1e-3}, {"optimizer.lrr": 1}]'))
  p = launch("--config", str(config), "--sweep", "--workdir", str(tmp_path / "sw"))
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      "config error: sweep trial 'optimizer.lrr=1': no config key 'optimizer.lrr'")
  assert not (tmp_path / "sw").exists()
