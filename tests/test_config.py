import os
import subprocess
import sys

import pytest

from conftest import small_config
from jaxlm.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def errors_for(**overrides):
  return validate(small_config(**overrides), num_devices=8)


def test_small_config_is_valid():
  assert errors_for() == []


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 3}, "mesh: "),
    ({"mesh.fsdp": 2, "mesh.data": 2, "mesh.tensor": 1}, "= 4, but there are 8 devices"),
    ({"data.batch_size": 12}, "data.batch_size=12 (per microbatch 12) is not divisible by the "
                              "data-parallel size mesh.data*mesh.fsdp=8"),
    ({"optimizer.grad_accum_steps": 3}, "data.batch_size=8 is not divisible by optimizer.grad_accum_steps=3"),
    ({"model.num_kv_heads": 3}, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    ({"data.train": "/nonexistent/*.txt"}, "data.train: no file matches '/nonexistent/*.txt'"),
    ({"data.tokenizer": "/nonexistent/tok.model"}, "data.tokenizer: no such file"),
    ({"init_from": "/nonexistent/run"}, "init_from: no such path"),
    ({"optimizer.lr": -1.0}, "optimizer.lr=-1.0: must be > 0"),
    ({"model.remat": "some"}, "model.remat='some': must be one of none, minimal, full"),
    ({"optimizer.min_lr_ratio": 2.0}, "optimizer.min_lr_ratio=2.0: must be in [0, 1]"),
    ({"data.shards": 3}, "data.shards=3 must be a multiple of the 1 process(es) and divide "
                         "data.batch_size=8"),
    ({"data.shards": 2, "task": "dpo"}, "data.shards=2: only pretrain and sft split"),
])
def test_each_problem_is_one_line_naming_the_key(overrides, message):
  errors = errors_for(**overrides)
  assert any(message in e for e in errors), errors
  assert all("\n" not in e for e in errors)


def test_config_arg_values_are_checked():
  from jaxlm.config import ConfigError
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "pretrain_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config("family=gpt2").model.family == "gpt2"
  with pytest.raises(ConfigError, match="family='gpt3': must be one of llama, gpt2"):
    module.get_config("family=gpt3")


def _launch(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxlm.launch", "--config",
                         os.path.join(ROOT, "configs", "pretrain_tiny.py"), "--workdir",
                         "/tmp/jaxlm-never-written", *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_launcher_rejects_bad_overrides_before_compiling():
  unknown = _launch("--config.optimizer.learning_rate=1e-3")
  assert unknown.returncode == 2
  assert unknown.stderr.strip() == ("config error: --config.optimizer.learning_rate: the config "
                                    "has no key 'learning_rate'")
  typo = _launch("--config.optimizer.wieght_decay=0.1")
  assert typo.stderr.strip().endswith("has no key 'wieght_decay' (did you mean "
                                      "'weight_decay'?)"), typo.stderr
  wrong_type = _launch("--config.steps=many")
  assert wrong_type.returncode == 2
  assert wrong_type.stderr.strip() == ("config error: flag --config.steps=many: invalid literal "
                                       "for int() with base 10: 'many'")
  invalid = _launch("--config.mesh.tensor=3", "--config.task=nope")
  assert invalid.returncode == 2
  lines = [l for l in invalid.stderr.splitlines() if l.startswith("config error:")]
  assert any("task='nope': unknown" in l for l in lines), invalid.stderr
  assert any(l.startswith("config error: mesh") for l in lines), invalid.stderr
  assert "Traceback" not in invalid.stderr
  assert not os.path.exists("/tmp/jaxlm-never-written")
