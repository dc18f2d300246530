"""The pipeline outside a stage's training loop: a stage's inputs are on disk before the
stage starts (so a SIGKILL cannot let a changed config resume stale work), and SIGTERM
in any phase ends the run cleanly with a line saying so."""

import json
import os
import signal

import pytest

from jaxlm import pipeline, tasks
from jaxlm.config import load_module, set_key
from jaxlm.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def pipeline_config(**overrides):
  module = load_module(os.path.join(REPO, "configs", "pipeline_tiny.py"), "pipeline_tiny")
  c = module.get_config(None)
  for key, value in overrides.items():
    set_key(c, key, value)
  return c


class Killed(BaseException):
  """What a SIGKILL leaves: the stage's run stops, and no code after it runs."""


def test_a_stage_killed_mid_run_refuses_a_changed_config_on_the_next_run(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(b"stand-in")
  seen = {}

  def killed(stage, stage_dir):
    with open(os.path.join(stage_dir, pipeline.STAGE_FILE)) as f:
      seen.update(json.load(f))  # on disk already when the stage's run starts
    raise Killed()
  monkeypatch.setattr(tasks, "run", killed)
  config = pipeline_config()
  with pytest.raises(Killed):
    pipeline.run_stage(config, "pretrain", workdir, log=lambda m: None)
  assert seen["inputs"] == pipeline._inputs(config, "pretrain", workdir)
  changed = pipeline_config(**{"pretrain.optimizer.lr": 1e-2})
  with pytest.raises(ConfigError, match=r"^pretrain: .* was trained with other inputs "
                     r"\(its config \(pretrain.\*\) changed since\)"):
    pipeline.run_stage(changed, "pretrain", workdir, log=lambda m: None)


@pytest.mark.parametrize("phase", ["stage", "report"])
def test_sigterm_outside_training_ends_the_pipeline_cleanly(tmp_path, monkeypatch, phase,
                                                           capsys):
  after = []

  def sigterm_then_go_on(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    after.append("ran on")  # never reached: the unit is abandoned at the signal
    return {}
  if phase == "stage":
    monkeypatch.setattr(pipeline, "train_tokenizer", sigterm_then_go_on)
  else:
    monkeypatch.setattr(pipeline, "train_tokenizer", lambda *a, **k: None)
    from jaxlm import report
    monkeypatch.setattr(report, "write", sigterm_then_go_on)
  config = pipeline_config(stages="tokenizer")
  assert pipeline.run(config, str(tmp_path)) == {}
  where = "the tokenizer stage" if phase == "stage" else "the report"
  said = capsys.readouterr().out.splitlines()
  assert said[-1].startswith(f"SIGTERM: stopped during {where}; ")
  assert after == []
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
