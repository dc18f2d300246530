"""Config fuzzing: an invalid override is one line naming its key, never a traceback.

Random overrides of real keys of real configs go through the launcher's own path in this
process (`jaxlm.cli.parse_config_flags`: the config flag read by jaxlm.cli, the others by
absl, then `validate`): each is either refused while parsing with a one-line ConfigError
naming the key, or accepted and then, when the value is out of the key's range, reported
by `validate` in a line naming the key. `set_key` (sweeps, tools/bench.py --set) gets the same
treatment with Python values. A few launcher processes check exit status 2 and stderr.
"""

import math
import os
import subprocess
import sys

import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ml_collections
from jaxlm import config as config_lib
from jaxlm.cli import define_config_file, parse_config_flags
from jaxlm.config import ConfigError, base_config, get_key, set_key
from jaxlm.validate import config_errors as validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIGS = ["pretrain_tiny.py", "pretrain_tiny.py:family=gpt2", "sft_tiny.py", "dpo_tiny.py",
           "grpo_tiny.py", "eval.py"]
# Derandomized: CI runs the same examples every time; JAXLM_FUZZ_EXAMPLES=5000 explores more.
FUZZ = settings(max_examples=int(os.environ.get("JAXLM_FUZZ_EXAMPLES", "50")), deadline=None,
                database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _leaves(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield prefix + key, value
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


LEAVES = dict(_leaves(base_config()))
KEYS = sorted(LEAVES)
NUMERIC = {k for k, v in LEAVES.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
NEGATIVE_OK = {"mesh.data", "mesh.fsdp", "mesh.tensor", "reward.model_weight"}  # -1: fill
MINUS_ONE_OK = {"eval.lm_eval_num_fewshot"}  # -1: each lm_eval task's own few-shot count


def load(config_file, *overrides):
  """The launcher's parsing, in this process: (config, None) or (None, ConfigError)."""
  argv = ["launch", "--config", os.path.join(ROOT, "configs", config_file), "--workdir",
          "/tmp/jaxlm-never-written", *overrides]
  fv = flags.FlagValues()
  holder = define_config_file("config", "", flag_values=fv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  try:
    parse_config_flags(argv, fv)
  except ConfigError as e:
    return None, e
  return holder.value, None


def out_of_range(key, value) -> bool:
  """An independent statement of which numbers no key accepts, plus the config module's
  own tables (intervals, choices), whose wiring is what is under test."""
  if not math.isfinite(value):
    return True
  if isinstance(LEAVES[key], int) and abs(value) > 2**31 - 1:
    return True
  floor = -1 if key.startswith("mesh.") or key in MINUS_ONE_OK else 0  # -1: a sentinel
  if value < floor and key not in NEGATIVE_OK:
    return True
  if key in config_lib._RANGES and not config_lib._in_interval(value, config_lib._RANGES[key]):
    return True
  return False


def invalid(key, value) -> bool:
  """Whether `value`, as the config holds it after parsing, must be reported for `key`."""
  if key in config_lib._CHOICES:
    return value not in config_lib._CHOICES[key]
  if key in NUMERIC:
    return out_of_range(key, value)
  return False


def assert_one_line_naming(message, key):
  assert "\n" not in message and "\r" not in message, repr(message)
  assert "Traceback" not in message, message
  assert key in message, (key, message)


def check(config_file, key, text):
  config, error = load(config_file, f"--config.{key}={text}")
  if error is not None:
    assert_one_line_naming(str(error), key)
    return
  errors = validate(config, num_devices=8)
  for e in errors:
    assert "\n" not in e and "Traceback" not in e, repr(e)
  if invalid(key, get_key(config, key)):  # judged as parsed: "1_000" is 1000 to absl too
    assert any(key in e for e in errors), (key, text, errors)


NUMBER_TEXT = st.one_of(
    st.sampled_from(["-1", "0", "-0.5", "0.5", "1", "2", "5", "nan", "-nan", "inf", "-inf",
                     "1e400", "1e-400", "99999999999999999999", "2147483648", "-2147483649",
                     "1.5", "1e3", "0x10", "1_000", "+3", " 7 ", "-", "one"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-2**70, 2**70).map(str))
ANY_TEXT = st.one_of(
    st.sampled_from(["", " ", "None", "True", "false", "maybe", "[1, 2]", "{'a': 1}", "{}",
                     "()", "(", "x", "'", "\\n", "1\n2", "é", "/nonexistent/*.txt",
                     "builtin:nope", "tfds:", "@stage"]),
    st.text(max_size=12))


def text_for(key):
  """An override text to try on `key`: numbers (mostly bad ones) for numeric keys."""
  return st.one_of(NUMBER_TEXT, ANY_TEXT) if key in NUMERIC else ANY_TEXT


@FUZZ
@given(config_file=st.sampled_from(CONFIGS), data=st.data())
def test_every_override_is_accepted_or_one_line_naming_its_key(config_file, data):
  key = data.draw(st.sampled_from(KEYS), label="key")
  text = data.draw(text_for(key), label="text")
  check(config_file, key, text.replace("\x00", ""))  # a command line holds no NUL


def test_every_numeric_key_refuses_every_kind_of_bad_number():
  for key in sorted(NUMERIC):
    for text in ("nan", "inf", "-inf", "-1", "-2", "0", "2147483648", "1e400"):
      check("pretrain_tiny.py", key, text)


def near_miss(key, how, i):
  parts = key.split(".")
  leaf = parts[-1]
  j = i % len(leaf)
  if how == "drop" and len(leaf) > 1:
    leaf = leaf[:j] + leaf[j + 1:]
  elif how == "double":
    leaf = leaf[:j] + leaf[j] + leaf[j:]
  elif how == "swap" and len(leaf) > 1 and j + 1 < len(leaf):
    leaf = leaf[:j] + leaf[j + 1] + leaf[j] + leaf[j + 2:]
  elif how == "section" and len(parts) > 1:
    return ".".join([parts[0][:-1]] + parts[1:])  # optimizer.lr -> optimize.lr
  elif how == "below":
    return key + ".x"  # a key under a value
  else:
    leaf += "s"
  return ".".join(parts[:-1] + [leaf])


@FUZZ
@given(config_file=st.sampled_from(CONFIGS), key=st.sampled_from(KEYS),
       how=st.sampled_from(["drop", "double", "swap", "section", "below", "plural"]),
       i=st.integers(0, 40), text=st.sampled_from(["1", "0.5", "x", "True"]))
def test_an_unknown_key_near_a_real_one_is_one_line_naming_it(config_file, key, how, i, text):
  wrong = near_miss(key, how, i)
  if wrong in LEAVES or isinstance(LEAVES[key], ml_collections.ConfigDict):
    return
  config, error = load(config_file, f"--config.{wrong}={text}")
  assert error is not None, wrong
  assert_one_line_naming(str(error), wrong)


PY_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
    st.sampled_from([float("inf"), -1.0, 0.0, 2.0, 1e300, "", "x", "(", [], (), {},
                     {"lr": 1.0}, ("a",), (("embed", "nowhere"),)]),
    st.text(max_size=8))


@FUZZ
@given(key=st.sampled_from(KEYS), value=PY_VALUES)
def test_set_key_is_one_line_or_validate_reports_the_key(key, value):
  """Sweeps and tools/bench.py --set change keys with Python values."""
  config, _ = load("pretrain_tiny.py")
  try:
    set_key(config, key, value)
  except ConfigError as e:
    assert_one_line_naming(str(e), key)
    return
  errors = validate(config, num_devices=8)
  assert all("\n" not in e for e in errors), errors
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if key in NUMERIC and number and out_of_range(key, value):
    assert any(key in e for e in errors), (key, value, errors)
  if key in config_lib._CHOICES and value not in config_lib._CHOICES[key]:
    assert any(key in e for e in errors), (key, value, errors)


def test_every_numeric_key_has_a_range():
  ranged = set(config_lib._RANGES)
  assert NUMERIC - ranged == NEGATIVE_OK, sorted(NUMERIC - ranged - NEGATIVE_OK)
  assert ranged <= NUMERIC, sorted(ranged - NUMERIC)  # no table names a key that's gone


@pytest.mark.parametrize("override, message", [
    ("optimizer.b1=2", "optimizer.b1=2.0: must be in [0, 1)"),
    ("optimizer.b2=1", "optimizer.b2=1.0: must be in [0, 1)"),
    ("optimizer.eps=-1", "optimizer.eps=-1.0: must be > 0"),
    ("model.rope_theta=-1", "model.rope_theta=-1.0: must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0: must be in (0, 1)"),
    ("model.max_seq_len=0", "model.max_seq_len=0: must be > 0"),
    ("data.tokenizer_vocab_size=-3", "data.tokenizer_vocab_size=-3: must be > 0"),
    ("data.tokenizer_sample_chars=0", "data.tokenizer_sample_chars=0: must be > 0"),
    ("model.init_std=-1", "model.init_std=-1.0: must be > 0"),
    ("rl.gamma=5", "rl.gamma=5.0: must be in [0, 1]"),
    ("rl.lam=-0.1", "rl.lam=-0.1: must be in [0, 1]"),
    ("lora.dropout=1", "lora.dropout=1.0: must be in [0, 1)"),
    ("lora.targets=(", "lora.targets='(': not a regular expression"),
    ("sharding.rules=x", "sharding.rules[0]='x': each rule is"),
    ("optimizer.lr=inf", "optimizer.lr=inf: must be a finite number"),
    ("optimizer.grad_clip=nan", "optimizer.grad_clip=nan: must be a finite number"),
    ("model.d_model=99999999999999999999", "model.d_model=99999999999999999999: out of range"),
    ("loss_spike_factor=0.5", "loss_spike_factor=0.5: must be 0 (off) or > 1"),
    ("eval.chat_template=chatlm", "eval.chat_template='chatlm': must be one of"),
    ("optimizer={'lr': 1.0}", "optimizer.b1: missing"),
])
def test_survey_cases_are_reported(override, message):
  config, error = load("pretrain_tiny.py", f"--config.{override}")
  assert error is None, error
  errors = validate(config, num_devices=8)
  assert [e for e in errors if message in e], errors


@pytest.mark.parametrize("spec, message", [
    ("pretrain_tiny.py:family=gpt3", "pretrain_tiny.py:family=gpt3: config arg family='gpt3': "
                                     "must be one of llama, gpt2"),
    ("pretrain_tiny.py:famly=gpt2", "pretrain_tiny.py:famly=gpt2: config arg 'famly=gpt2': "
                                    "expected one of family=..."),
    ("nope.py", "nope.py: no such file"),
])
def test_bad_config_files_are_one_line_naming_the_file(spec, message):
  config, error = load(spec)
  assert config is None and message in str(error) and "\n" not in str(error), error
  _, error = load(spec, "--config.steps=3")  # overrides given too
  assert message in str(error) and "\n" not in str(error), error


def test_a_config_file_that_fails_names_the_file_and_line(tmp_path):
  for body, message in [("def get_config(arg=None):\n  return undefined\n",
                         "NameError: name 'undefined' is not defined (line 2)"),
                        ("def get_config(arg=None)\n  return 1\n", "SyntaxError: "),
                        ("x = 1\n", "AttributeError: "),
                        ("def get_config(arg=None):\n  return {}['a']\n", "KeyError: 'a'")]:
    path = tmp_path / "cfg.py"
    path.write_text(body)
    _, error = load(str(path))
    assert error is not None and f"--config={path}: {message}" in str(error), error
    assert "\n" not in str(error) and "has no key" not in str(error), error


def launch(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxlm.launch", "--workdir",
                         "/tmp/jaxlm-never-written", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=180)


@pytest.mark.parametrize("args, named", [
    (["--config", "configs/pretrain_tiny.py", "--config.optimizer.grad_clip=nan"],
     "optimizer.grad_clip"),
    (["--config", "configs/no_such_config.py", "--config.steps=3"], "no_such_config.py"),
    (["--config", "configs/pretrain_tiny.py:family=gpt3"], "pretrain_tiny.py:family=gpt3"),
])
def test_the_launcher_exits_2_with_one_line_naming_the_key(args, named):
  p = launch(*args)
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  last = [line for line in p.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("config error: ") and named in last, p.stderr[-3000:]
  assert not os.path.exists("/tmp/jaxlm-never-written")
