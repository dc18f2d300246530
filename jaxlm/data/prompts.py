"""Prompt records for RL: a prompt to generate from, and the fields reward functions see.

A record is JSON: `prompt` (a string, or a list of {"role", "content"} messages),
`question` (GSM8K's name for it), or Alpaca's `instruction` (+ `input`). Every other
field (`answer`, `output`, ...) is passed to reward functions by name. Bad records
follow `data.on_error`, with their file and line, like SFT's; so does a record without
a field a reward function reads (`check`). Prompts longer than the limit are cut or
dropped, and counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.data import sft


@dataclasses.dataclass
class Prompt:
  turns: list[tuple[str, str]]   # the conversation to answer
  text: str                      # its last user message (what reward functions see)
  fields: dict                   # every other field of the record
  ids: np.ndarray | None = None  # BOS and the generation prompt (load_prompts with `tok`)
  where: str = ""                # its file:line (what a reward function's error names)


def to_prompt(record) -> Prompt | str:
  if not isinstance(record, dict):
    return "wrong_type"
  if "prompt" in record:
    value, used = record["prompt"], ("prompt",)
  elif "question" in record:
    value, used = record["question"], ("question",)
  elif "instruction" in record:
    extra = record.get("input") or ""
    if not isinstance(record["instruction"], str) or not isinstance(extra, str):
      return "wrong_type"
    value = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    used = ("instruction", "input")
  else:
    return "missing_field"
  if isinstance(value, str):
    turns = [("user", value)]
  elif isinstance(value, list) and value and all(
      isinstance(m, dict) and m.get("role") in sft.ROLES and isinstance(m.get("content"), str)
      for m in value):
    turns = [(m["role"], m["content"]) for m in value]
  else:
    return "wrong_type"
  if not turns[-1][1].strip():
    return "empty_prompt"
  fields = {k: v for k, v in record.items() if k not in used}
  return Prompt(turns, turns[-1][1], fields)


def fit(ids: np.ndarray, max_len: int, truncation: str) -> np.ndarray | None:
  """Prompt ids within `max_len`: as they are, cut from the left to BOS and the last
  max_len - 1 ids (so they still end where the reply starts), or None with "drop"."""
  if len(ids) <= max_len:
    return ids
  if truncation == "drop":
    return None
  return np.concatenate([ids[:1], ids[len(ids) - max_len + 1:]])


def load_prompts(files: list[str], *, on_error: str, check=None, tok=None, template=None,
                 max_len: int = 0, truncation: str = "truncate",
                 max_bytes: int = sft.MAX_RECORD_BYTES) -> sft.Examples:
  """Every record of `files` -> Prompts, counted (records, used, skipped_<reason>).

  `check(fields)` names what a record lacks for the reward functions (a reason), or None.
  With `tok`, each prompt's `ids` are rendered with `template` (its text encoded as
  content: only the template inserts special tokens) and, over `max_len`,
  truncated (counted `truncated`) or dropped (`dropped_too_long`) as `truncation` says."""
  out = sft.Examples()
  for path in files:
    for where, record in sft.read_records(path, max_bytes):
      out.counts["records"] += 1
      prompt = record if isinstance(record, str) else to_prompt(record)
      if not isinstance(prompt, str) and check:
        prompt = check(prompt.fields) or prompt
      if isinstance(prompt, str):
        out.skip(where, prompt, on_error)
        continue
      prompt.where = where
      if tok is not None:
        ids = sft.prompt_ids(prompt.turns, tok, template)
        if isinstance(ids, str):  # the model's own template refuses it
          out.skip(where, ids, on_error)
          continue
        prompt.ids = fit(ids, max_len, truncation) if max_len else ids
        if prompt.ids is None:
          out.skip(where, "dropped_too_long", on_error)
          continue
        out.counts["truncated"] += len(prompt.ids) < len(ids)
      out.counts["used"] += 1
      out.examples.append(prompt)
  return out
