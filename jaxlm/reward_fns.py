"""Reward sources for RL: verifiable functions, user functions and reward models,
combined with weights.

`config.reward.fn` is a comma-separated list of `NAME[=WEIGHT]`, where NAME is a
built-in (`math_answer`, `format`, `overlap`) or `package.module:function`: that is the
user's own code, imported (and so run) when the config is validated and called in the
training process. A function is called as `fn(prompts, completions, **fields)`: the
prompt texts, the completion texts and, for every other field of the prompt records,
the list of its values (a function without `**kwargs` gets only the fields it names;
one it requires without a default is a field every prompt record must have); it
returns one finite number per completion. Validation checks that the target imports and
takes two positional arguments; an exception inside it, or a value that is not a finite
number, stops the run with one line naming the function and the prompt record.
`config.reward.model` adds a trained jaxlm reward model with weight
`config.reward.model_weight`. The sources' weighted sum is the reward.

A built-in that reads a field says so in its `needs` (fields -> a reason, or None): a
prompt record without it is a bad record when it is loaded, not a reward of 0 later.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import math
import re

import numpy as np

from jaxlm import reward_model, runs
from jaxlm.errors import ConfigError, DataError, error_detail


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


def _signature_problem(fn) -> str | None:
  """Why `fn` can't be called as fn(prompts, completions, **fields), or None."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return "its signature can't be read"
  kinds = inspect.Parameter
  params = list(sig.parameters.values())
  positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY,
                                                 kinds.POSITIONAL_OR_KEYWORD)]
  if len(positional) < 2 and not any(p.kind == kinds.VAR_POSITIONAL for p in params):
    return f"it takes {sig}, not (prompts, completions, **fields)"
  if any(p.kind == kinds.POSITIONAL_ONLY and p.default is p.empty for p in positional[2:]):
    return f"it takes {sig}: fields are passed by name, so only two positional arguments"
  return None


def _field_names(fn) -> tuple[set[str] | None, set[str]]:
  """The fields `fn` takes (None: any, it has **kwargs) and those it requires."""
  kinds = inspect.Parameter
  params = list(inspect.signature(fn).parameters.values())
  first_two = [p.name for p in params  # prompts, completions
               if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)][:2]
  named = [p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
           and p.name not in first_two]
  required = {p.name for p in named if p.default is p.empty}
  if any(p.kind == kinds.VAR_KEYWORD for p in params):
    return None, required
  return {p.name for p in named}, required


def resolve(name: str):
  if name in BUILTINS:
    return BUILTINS[name]
  module, sep, attr = name.partition(":")
  if not sep or not module or not attr:
    raise ConfigError(f"reward.fn: {name!r} is neither a built-in ({', '.join(BUILTINS)}) "
                      f"nor 'package.module:function'")
  try:
    fn = importlib.import_module(module)
    for part in attr.split("."):
      fn = getattr(fn, part)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"reward.fn: can't load {name!r}: {error_detail(e)}") from None
  except Exception as e:  # pylint: disable=broad-except  # the user's module failed to import
    raise ConfigError(f"reward.fn: importing {module!r} for {name!r} raised "
                      f"{error_detail(e)}") from None
  if not callable(fn):
    raise ConfigError(f"reward.fn: {name!r} is not callable")
  problem = _signature_problem(fn)
  if problem:
    raise ConfigError(f"reward.fn: {name!r} can't be a reward function: {problem}")
  return fn


def spec_errors(spec: str) -> list[str]:
  """Every problem with `reward.fn`, each one line: its syntax and weights, and each
  user function imported and checked against the signature (config validation)."""
  try:
    parsed = parse(spec)
  except ConfigError as e:
    return [str(e)]
  errors = []
  for name, weight in parsed:
    if not math.isfinite(weight):
      errors.append(f"reward.fn={spec!r}: the weight of {name!r} must be a finite number")
      continue
    try:
      resolve(name)
    except ConfigError as e:
      errors.append(str(e))
  return errors


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
    self._fields = {name: _field_names(fn) for name, fn, _ in self.fns if name not in BUILTINS}
    self.model = None
    self.model_weight = model_weight
    if model_path:
      self.model = runs.load_reward_model(model_path)
    if not self.fns and self.model is None:
      raise ConfigError("reward.fn / reward.model: RL needs a reward source")

  def check(self, fields: dict) -> str | None:
    """Why a prompt record (its fields) can't be scored by these sources, or None."""
    for name, fn, _ in self.fns:
      if name in self._fields:  # a user function: the fields it requires
        missing = sorted(self._fields[name][1] - set(fields))
        reason = f"missing_field_{missing[0]}" if missing else None
      else:
        reason = getattr(fn, "needs", lambda _: None)(fields)
      if reason:
        return reason
    return None

  def _scores(self, name, fn, prompts, completions, fields: dict, where) -> np.ndarray:
    """One source's values, or a DataError naming it and the record at fault."""
    if name in self._fields and self._fields[name][0] is not None:
      fields = {k: v for k, v in fields.items() if k in self._fields[name][0]}
    n = len(completions)

    def record(i):
      at = f"the prompt at {where[i]}" if where and where[i] else "a prompt"
      return f"{at} (completion {i} of {n})"

    try:
      raw = fn(prompts, completions, **fields)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # the user's code: name the record
      culprit = None
      for i in range(min(n, 256)):  # the first completion it fails on alone
        try:
          fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in fields.items()})
        except Exception:  # pylint: disable=broad-except
          culprit = i
          break
      on = record(culprit) if culprit is not None else f"a batch of {n} completions"
      raise DataError(f"reward.fn {name!r} raised {error_detail(e)} on "
                      f"{on}") from None
    # Any array-like of numbers (a list, NumPy, JAX, torch): one finite number each.
    items = list(raw) if isinstance(raw, (list, tuple)) else None
    try:
      values = None if isinstance(raw, (str, bytes)) else np.asarray(raw, np.float64)
    except (TypeError, ValueError):
      values = None
    if values is None and items is not None and len(items) == n:
      for i, v in enumerate(items):  # name the first value that is not a number
        try:
          float(v) if not isinstance(v, (str, bytes)) else float("x")
        except (TypeError, ValueError):
          raise DataError(f"reward.fn {name!r} returned {v!r} for {record(i)}: rewards must "
                          f"be finite numbers") from None
    if values is None or values.shape != (n,):
      shape = (f"{values.size} values" if values is not None and values.ndim == 1 else
               f"{len(items)} values" if items is not None else repr(type(raw)))
      raise DataError(f"reward.fn {name!r} returned {shape} for {n} completions (it must "
                      f"return one number per completion)")
    for i in np.flatnonzero(~np.isfinite(values))[:1]:
      raise DataError(f"reward.fn {name!r} returned {float(values[i])!r} for {record(i)}: "
                      f"rewards must be finite numbers")
    return values

  def __call__(self, prompts, completions, fields: dict, prompt_messages=None, where=None):
    """-> (rewards [N] float32, {source: mean}). `where`: each completion's prompt record
    (file:line), named in the one-line error a failing reward function becomes."""
    total = np.zeros(len(completions), np.float64)
    means = {}
    for name, fn, w in self.fns:
      values = self._scores(name, fn, prompts, completions, fields, where)
      total += w * values
      means[name] = float(values.mean())
    if self.model is not None:
      scores = reward_model.score(self.model, prompt_messages or prompts, completions)
      total += self.model_weight * scores
      means["reward_model"] = float(scores.mean())
    return total.astype(np.float32), means
