"""A run's workdir: one launcher at a time, nothing written into a folder that holds
something else, the tokenizer the run trains with, and config files written whole."""

import json
import os
import subprocess
import sys

import pytest

from conftest import small_config, word_tokenizer
from jaxlm import fileio, workdir
from jaxlm.errors import ConfigError
from jaxlm.tasks import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def launch(workdir_path, *extra):
  cmd = [sys.executable, "-m", "jaxlm.launch", "--config", "configs/pretrain_tiny.py",
         "--workdir", str(workdir_path), "--config.steps=1", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def snapshot(folder):
  return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
          if os.path.isfile(os.path.join(folder, p))}


def test_the_launcher_refuses_a_locked_workdir_a_hugging_face_folder_and_a_huge_seq_len(
    tmp_path):
  """Each refusal comes before anything runs: exit 2, one line, nothing changed."""
  busy, hf_dir = tmp_path / "busy", tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
  (hf_dir / "model.safetensors").write_bytes(b"weights")
  before = snapshot(hf_dir)
  with workdir.lock(str(busy)) as holder:
    procs = [launch(busy), launch(hf_dir),
             launch(tmp_path / "long", "--config.data.seq_len=100000000")]
    outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
  assert f"another run holds it (pid {holder['pid']} on {holder['host']}" in outs[0][1]
  assert "holds a Hugging Face model" in outs[1][1] and "nothing was changed" in outs[1][1]
  assert snapshot(hf_dir) == before
  assert outs[2][1].startswith("config error: data.seq_len=100000000, data.batch_size=16: the "
                               "estimated ")
  assert "GiB one device holds" in outs[2][1] and not os.path.exists(tmp_path / "long")
  assert not os.path.exists(busy / workdir.LOCK)  # released when the block ended


def test_a_second_holder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
  with workdir.lock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirError, match="another run holds it"):
      with workdir.lock(str(tmp_path)):
        pass
  # A lock file left by a process that was killed (no flock is held on it any more).
  (tmp_path / workdir.LOCK).write_text(json.dumps({"host": "h", "pid": 999999999,
                                                   "started": "then"}))
  said = []
  with workdir.lock(str(tmp_path), log=said.append) as me:
    assert json.loads((tmp_path / workdir.LOCK).read_text())["pid"] == me["pid"] == os.getpid()
  assert said == [f"taking over the lock of {tmp_path} left by pid 999999999 on h, started "
                  f"then, which no longer holds it"]


def finished_run(folder, **model):
  c = small_config(**{f"model.{k}": v for k, v in model.items()})
  folder.mkdir(exist_ok=True)
  fileio.atomic_write_json(str(folder / "config.json"), json.loads(c.to_json_best_effort()))
  (folder / "checkpoints" / "20").mkdir(parents=True)
  return c


def test_another_task_or_architecture_is_refused_before_config_json_changes(tmp_path):
  finished_run(tmp_path, d_model=64, vocab_size=512)
  before = snapshot(tmp_path)
  other = small_config(**{"model.d_model": 128, "model.vocab_size": 512})
  with pytest.raises(workdir.WorkdirError, match=r"checkpoints are of another architecture "
                     r"\(model.d_model=64 there, 128 in this config\); nothing was changed"):
    workdir.write_config(other, str(tmp_path))
  with pytest.raises(workdir.WorkdirError, match="holds a task='pretrain' run, and this config "
                     "is task='sft'"):
    workdir.check(small_config(task="sft"), str(tmp_path), resolved=False)
  assert snapshot(tmp_path) == before
  # Before the tokenizer fixes it, vocab_size=0 is not a difference; what trains may change.
  workdir.check(small_config(**{"model.d_model": 64}), str(tmp_path), resolved=False)
  same = small_config(**{"model.d_model": 64, "model.vocab_size": 512, "model.remat": "full",
                         "optimizer.lr": 1e-4})
  workdir.write_config(same, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 1e-4


def test_a_workdir_tokenizer_that_differs_from_the_runs_is_an_error_naming_both(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  old = word_tokenizer(tmp_path / "a", "red blue green")
  new = word_tokenizer(tmp_path / "b", "one two three four")
  run = tmp_path / "run"
  common.keep_tokenizer(old, str(run))
  kept = run / "tokenizer.model"
  assert kept.read_bytes() == open(old.path, "rb").read()
  common.keep_tokenizer(old, str(run))  # the same tokenizer again: fine
  with pytest.raises(ConfigError) as e:
    common.keep_tokenizer(new, str(run))
  assert str(kept) in str(e.value) and new.path in str(e.value)
  assert kept.read_bytes() == open(old.path, "rb").read()


def test_atomic_writes_leave_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  fileio.atomic_write_json(str(path), {"a": 1})
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
  with pytest.raises(OSError):
    fileio.atomic_write_json(str(path), {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left
