import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from jaxlm import config as config_lib, generate, model
from jaxlm.errors import ConfigError
from jaxlm.validate import config_errors as validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  from jaxlm.errors import ConfigError
  from jaxlm.config import load_module
  module = load_module(os.path.join(ROOT, "configs", "pretrain_tiny.py"), "tiny")
  assert module.get_config("family=gpt2").model.family == "gpt2"
  with pytest.raises(ConfigError, match="family='gpt3': must be one of llama, gpt2"):
    module.get_config("family=gpt3")


def _parse(config_file, *args):
  """jaxlm.cli's reading of a launcher-like command line, in this process: (the config
  flag's holder, absl's flags, the arguments left)."""
  from absl import flags
  from jaxlm import cli
  fv = flags.FlagValues()
  holder = cli.define_config_file("config", "", flag_values=fv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_bool("sweep", False, "", flag_values=fv)
  rest = cli.parse_config_flags(["launch", "--config", str(config_file), *args], fv)
  return holder, fv, rest


def test_config_flags_apply_in_order_and_the_other_flags_stay_absls(tmp_path):
  flagfile = tmp_path / "flags"
  flagfile.write_text("--config.eval_every=5\n")
  holder, fv, rest = _parse(
      os.path.join(ROOT, "configs", "pretrain_tiny.py"), "--config.steps", "7", "--workdir",
      "w", "--sweep", "--config.data.shuffle", "--noconfig.async_checkpointing",
      "--config.optimizer.lr=1", "--config.sharding.rules=x", "--config.sharding.rules=y",
      "--config.steps=0x10", f"--flagfile={flagfile}", "extra", "--", "--config.seed=3")
  c = holder.value
  assert (c.steps, c.data.shuffle, c.async_checkpointing, c.optimizer.lr) == (16, True, False, 1.0)
  assert c.sharding.rules == ("x", "y") and c.eval_every == 5 and c.seed == 0
  assert fv.workdir == "w" and fv.sweep and rest == ["launch", "extra", "--config.seed=3"]
  assert holder.spec == os.path.join(ROOT, "configs", "pretrain_tiny.py")
  assert holder.overrides == {"steps": 16, "data.shuffle": True, "async_checkpointing": False,
                              "optimizer.lr": 1.0, "sharding.rules": ("x", "y"),
                              "eval_every": 5}
  with pytest.raises(AttributeError):
    c.new_key = 1  # locked


def test_a_config_file_gets_its_arg_only_when_given(tmp_path):
  import ml_collections
  path = tmp_path / "cfg.py"
  path.write_text("import ml_collections\n\ndef get_config(*args):\n"
                  "  return ml_collections.ConfigDict({'args': repr(args), 'file': __file__,\n"
                  "                                    'name': __name__})\n")
  assert _parse(path)[0].value.args == "()"
  holder = _parse(f"{path}:a=1,b")[0]
  assert holder.value.args == "('a=1,b',)" and holder.spec == f"{path}:a=1,b"
  assert holder.value.file == str(path) and holder.value.name == "config_config"
  assert isinstance(holder.value, ml_collections.ConfigDict)


@pytest.mark.parametrize("key, text, value", [
    ("data.train", "a, b", "a, b"),           # a string: the text as it is
    ("data.shuffle", "F", False), ("data.shuffle", "1", True), ("data.shuffle", None, True),
    ("steps", "0x10", 16), ("steps", " 7 ", 7), ("steps", "1_000", 1000),
    ("optimizer.lr", "1", 1.0), ("optimizer.lr", "nan", "nan"),
    ("sharding.rules", "data/*.txt", ("data/*.txt",)),
    ("sharding.rules", "(('embed', None),)", (("embed", None),)),
    ("sharding.rules", "[1, 2]", (1, 2)),
    ("optimizer", "{'lr': 1.0}", {"lr": 1.0}),  # a section, whole
])
def test_override_text_is_read_by_the_type_of_the_keys_value(key, text, value):
  import math
  import ml_collections
  from jaxlm.cli import parse_override
  from jaxlm.config import base_config
  got = parse_override(base_config(), key, text)
  if value == "nan":
    assert math.isnan(got)
  elif isinstance(value, dict):
    assert isinstance(got, ml_collections.ConfigDict) and got.to_dict() == value
  else:
    assert got == value and type(got) is type(value), (got, value)


def test_a_none_valued_key_takes_a_literal_or_else_the_text():
  import ml_collections
  from jaxlm.cli import parse_override
  c = ml_collections.ConfigDict({"x": None})
  assert [parse_override(c, "x", t) for t in ("3", "(1, 'a')", "true", "abc", "a b")] == [
      3, (1, "a"), True, "abc", "a b"]


@pytest.mark.parametrize("key, text, message", [
    ("data.shuffle", "yes", "flag --config.data.shuffle=yes: must be true or false"),
    ("steps", "1.5", "flag --config.steps=1.5: invalid literal for int() with base 10: '1.5'"),
    ("optimizer.lr", "fast", "flag --config.optimizer.lr=fast: could not convert string"),
    ("sharding.rules", "a b", "flag --config.sharding.rules=a b: not a tuple literal"),
    ("optimizer", "lr=1", "flag --config.optimizer=lr=1: a section takes a dict"),
    ("steps", None, "Missing value for flag --config.steps"),
    ("optimizer.lrr", "1", "--config.optimizer.lrr: the config has no key 'lrr' (did you mean "
                           "'lr'?)"),
    ("steps.x", "1", "--config.steps.x: the config has no key 'steps.x' (steps is a value, "
                     "not a section)"),
])
def test_an_override_that_cant_be_read_is_one_line_naming_it(key, text, message):
  from jaxlm.cli import apply_override
  from jaxlm.config import base_config
  from jaxlm.errors import ConfigError
  with pytest.raises(ConfigError) as e:
    apply_override(base_config(), key, text)
  assert str(e.value).startswith(message), str(e.value)


def test_every_knob_has_a_description_and_every_number_a_rule():
  import ml_collections
  from jaxlm import config as config_lib

  def keys(node, prefix=""):
    for k, v in node.items():
      yield prefix + k, v
      if isinstance(v, ml_collections.ConfigDict):
        yield from keys(v, f"{prefix}{k}.")

  values = dict(keys(config_lib.base_config()))
  knobs = {knob.key: knob for knob in config_lib.describe()}
  assert set(knobs) == set(values), sorted(set(knobs) ^ set(values))
  for key, value in values.items():
    knob = knobs[key]
    assert isinstance(knob.description, str) and knob.description.strip(), key
    assert "\n" not in knob.description, key
    if isinstance(value, ml_collections.ConfigDict):
      assert knob.default is config_lib.SECTION, key
      continue
    assert knob.default == value and type(knob.default) is type(value), (key, knob.default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      assert knob.rule is not None, f"{key}: a number with no rule"
    if isinstance(knob.rule, tuple):  # each default obeys its own rule
      assert value in knob.rule, (key, value, knob.rule)
    elif isinstance(knob.rule, str):
      assert config_lib._in_interval(value, knob.rule), (key, value, knob.rule)


def test_jitted_code_gets_the_model_section_frozen_and_hashable():
  section = config_lib.model_config("tiny", vocab_size=64, dtype="float32")
  frozen = config_lib.frozen_model(section)
  assert frozen.to_dict() == section.to_dict()  # every knob, the same values
  assert config_lib.frozen_model(frozen) is frozen
  with pytest.raises(dataclasses.FrozenInstanceError):
    frozen.d_model = 256
  assert hash(frozen) == hash(config_lib.frozen_model(section.to_dict()))
  with pytest.raises(ConfigError, match=r"^model\.widht: not a model setting"):
    config_lib.frozen_model({**section.to_dict(), "widht": 3})
  # A static argument of jax.jit, and the same forward pass as the ConfigDict's.
  params = model.init(section, jax.random.PRNGKey(0))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  static = jax.jit(model.forward, static_argnums=2)(params, tokens, frozen)
  closed = jax.jit(lambda p, t: model.forward(p, t, section))(params, tokens)
  np.testing.assert_array_equal(np.asarray(static), np.asarray(closed))
  assert isinstance(generate.Engine(section, eos_id=1).cfg, config_lib.ModelConfig)
