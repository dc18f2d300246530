"""The launcher refuses bad config overrides in one line each, before anything compiles."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
