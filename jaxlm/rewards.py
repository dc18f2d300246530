"""Reward sources for RL: verifiable functions, user functions and reward models,
combined with weights.

`config.reward.fn` is a comma-separated list of `NAME[=WEIGHT]`, where NAME is a
built-in (`math_answer`, `format`) or `package.module:function`. A function is called
as `fn(prompts, completions, **fields)`: the prompt texts, the completion texts and,
for every other field of the prompt records, the list of its values; it returns one
float per completion. `config.reward.model` adds a trained jaxlm reward model with
weight `config.reward.model_weight`. The sources' weighted sum is the reward.

A built-in that reads a field says so in its `needs` (fields -> a reason, or None): a
prompt record without it is a bad record when it is loaded, not a reward of 0 later.
"""

from __future__ import annotations

import collections
import importlib
import re

import numpy as np

from jaxlm.config import ConfigError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
  try:
    return float(text.replace(",", "").rstrip("."))
  except ValueError:
    return None


def final_answer(text: str) -> float | None:
  """The number after the last `####` (GSM8K's answer line), else the last number."""
  if "####" in text:
    found = _NUMBER.findall(text.rsplit("####", 1)[1])
    return _number(found[0]) if found else None
  found = _NUMBER.findall(text)
  return _number(found[-1]) if found else None


def math_answer(prompts, completions, answer=None, **_):
  """1 where the completion's final answer equals the reference's (the `answer` field:
  a number, or GSM8K text ending in `#### N`), else 0."""
  if answer is None:
    raise ConfigError("reward.fn=math_answer: the prompt records need an 'answer' field")
  out = []
  for completion, ref in zip(completions, answer):
    want = final_answer(str(ref))
    got = final_answer(completion)
    out.append(float(want is not None and got is not None and abs(got - want) < 1e-6))
  return out


def _needs_answer(fields: dict) -> str | None:
  if fields.get("answer") is None:
    return "missing_field_answer"
  return None if final_answer(str(fields["answer"])) is not None else "wrong_value_answer"


math_answer.needs = _needs_answer


def format_reward(prompts, completions, **_):
  """1 where the completion ends with a final-answer line `#### N`, else 0."""
  return [float(bool(re.search(r"####\s*-?\d[\d,]*(\.\d+)?\s*$", c.strip()))) for c in completions]


def _words(text: str) -> list[str]:
  return re.findall(r"\w+", text.lower())


def overlap(prompts, completions, reference=None, answer=None, output=None, **_):
  """Unigram F1 between the completion and the record's reference text (the field
  `reference`, else `answer`, else `output`): a graded, verifiable proxy for matching it."""
  columns = [c for c in (reference, answer, output) if c is not None]
  if not columns:
    raise ConfigError("reward.fn=overlap: the prompt records need a 'reference', 'answer' "
                      "or 'output' field")
  # each record's own first field: records of one batch may name it differently
  refs = [next((c[i] for c in columns if c[i] is not None), None)
          for i in range(len(completions))]
  out = []
  for completion, ref in zip(completions, refs):
    got, want = _words(completion), _words(str(ref))
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    out.append(0.0 if not common else 2 * common / (len(got) + len(want)))
  return out


def _needs_reference(fields: dict) -> str | None:
  found = any(fields.get(k) is not None for k in ("reference", "answer", "output"))
  return None if found else "missing_field_reference"


overlap.needs = _needs_reference


BUILTINS = {"math_answer": math_answer, "format": format_reward, "overlap": overlap}


def resolve(name: str):
  if name in BUILTINS:
    return BUILTINS[name]
  module, sep, attr = name.partition(":")
  if not sep:
    raise ConfigError(f"reward.fn: {name!r} is neither a built-in ({', '.join(BUILTINS)}) "
                      f"nor 'package.module:function'")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"reward.fn: can't load {name!r}: {e}") from None
  if not callable(fn):
    raise ConfigError(f"reward.fn: {name!r} is not callable")
  return fn


def parse(spec: str) -> list[tuple[str, float]]:
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, weight = item.partition("=")
    try:
      out.append((name.strip(), float(weight) if weight else 1.0))
    except ValueError:
      raise ConfigError(f"reward.fn: weight {weight!r} of {name!r} is not a number") from None
  return out


class Rewards:
  """The weighted sum of the configured sources, with each source's mean for metrics."""

  def __init__(self, fn_spec: str, model_path: str = "", model_weight: float = 1.0):
    self.fns = [(name, resolve(name), w) for name, w in parse(fn_spec)]
    self.model = None
    self.model_weight = model_weight
    if model_path:
      from jaxlm import reward  # pylint: disable=import-outside-toplevel
      self.model = reward.load(model_path)
    if not self.fns and self.model is None:
      raise ConfigError("reward.fn / reward.model: RL needs a reward source")

  def check(self, fields: dict) -> str | None:
    """Why a prompt record (its fields) can't be scored by these sources, or None."""
    for _, fn, _ in self.fns:
      reason = getattr(fn, "needs", lambda _: None)(fields)
      if reason:
        return reason
    return None

  def __call__(self, prompts, completions, fields: dict, prompt_messages=None):
    """-> (rewards [N] float32, {source: mean})."""
    total = np.zeros(len(completions), np.float64)
    means = {}
    for name, fn, w in self.fns:
      values = np.asarray(fn(prompts, completions, **fields), np.float64)
      if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
        raise ValueError(f"reward.fn {name!r} returned {values.shape} values (or non-finite "
                         f"ones) for {len(completions)} completions")
      total += w * values
      means[name] = float(values.mean())
    if self.model is not None:
      from jaxlm import reward  # pylint: disable=import-outside-toplevel
      scores = reward.score(self.model, prompt_messages or prompts, completions)
      total += self.model_weight * scores
      means["reward_model"] = float(scores.mean())
    return total.astype(np.float32), means
