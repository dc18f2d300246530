"""Preference records -> a prompt (conversation turns) and (chosen, rejected, margin) pairs.

Formats, detected by their fields (TRL's conventions where they exist):

    explicit   {"prompt", "chosen", "rejected"}: strings, or lists of messages
    implicit   {"chosen", "rejected"}: whole conversations sharing their prompt, as message
               lists or as Anthropic HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...")
    ranked     {"prompt", "responses"}: responses best first, expanded to every pair, the
               prompt kept once (InstructGPT's K-way rankings)

with an optional numeric "margin" per record. A record that can't be used comes back as
a reason string, to be raised or counted with its file and line like SFT's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass
class Preference:
  prompt: list[tuple[str, str]]                 # (role, text) turns before the responses
  pairs: list[tuple[str, str, float | None]]    # (chosen, rejected, margin)


def parse_hh(text: str) -> list[tuple[str, str]] | None:
  """HH-RLHF dialogue text -> (role, text) turns; None when it isn't one."""
  pieces = _HH_TURN.split(text)
  if pieces[0].strip() or len(pieces) < 3:
    return None
  roles = {"Human": "user", "Assistant": "assistant"}
  return [(roles[who], said.strip()) for who, said in zip(pieces[1::2], pieces[2::2])]


def _messages(value) -> list[tuple[str, str]] | None:
  if not isinstance(value, list) or not value:
    return None
  out = []
  for m in value:
    if (not isinstance(m, dict) or m.get("role") not in ROLES
        or not isinstance(m.get("content"), str)):
      return None
    out.append((m["role"], m["content"]))
  return out


def _response(value) -> str | None:
  """A response: a string, or a one-assistant-message list."""
  if isinstance(value, str):
    return value
  turns = _messages(value)
  if turns and len(turns) == 1 and turns[0][0] == "assistant":
    return turns[0][1]
  return None


def _implicit(chosen, rejected) -> tuple[list, str, str] | str:
  """Split two whole conversations into their shared prompt and final responses."""
  if isinstance(chosen, str) and isinstance(rejected, str):
    # As TRL extracts it: the longest common prefix, cut back to its last assistant
    # marker. What follows may hold further turns (HH-RLHF has some): it stays text.
    if parse_hh(chosen) is None or parse_hh(rejected) is None:
      return "wrong_type"
    marker = "\n\nAssistant:"
    cut = os.path.commonprefix([chosen, rejected]).rfind(marker)
    prompt_turns = parse_hh(chosen[:cut]) if cut > 0 else None
    if not prompt_turns or prompt_turns[-1][0] != "user":
      return "no_shared_prompt"
    return (prompt_turns, chosen[cut + len(marker):].strip(),
            rejected[cut + len(marker):].strip())
  else:
    chosen_turns, rejected_turns = _messages(chosen), _messages(rejected)
    if chosen_turns is None or rejected_turns is None:
      return "wrong_type"
  if (chosen_turns[-1][0] != "assistant" or rejected_turns[-1][0] != "assistant"
      or chosen_turns[:-1] != rejected_turns[:-1]):
    return "no_shared_prompt"
  return chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1]


def to_preference(record) -> Preference | str:
  """A record -> Preference, or the reason it can't be used."""
  if not isinstance(record, dict):
    return "wrong_type"
  margin = record.get("margin")
  if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
    return "wrong_type"
  if "responses" in record:
    if "prompt" not in record:
      return "missing_field"
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
      return "wrong_type"
    responses = [_response(r) for r in responses]
    pairs = [(a, b, margin) for a, b in itertools.combinations(responses, 2)]
  elif "chosen" in record and "rejected" in record:
    if "prompt" in record:
      chosen, rejected = _response(record["chosen"]), _response(record["rejected"])
      pairs = [(chosen, rejected, margin)]
    else:
      split = _implicit(record["chosen"], record["rejected"])
      if isinstance(split, str):
        return split
      prompt_turns, chosen, rejected = split
      if not prompt_turns:
        return "no_shared_prompt"
      pairs = [(chosen, rejected, margin)]
  else:
    return "missing_field"
  if "prompt" in record:
    prompt = record["prompt"]
    prompt_turns = [("user", prompt)] if isinstance(prompt, str) else _messages(prompt)
    if prompt_turns is None:
      return "wrong_type"
  if any(c is None or r is None for c, r, _ in pairs):
    return "wrong_type"
  if any(not c.strip() or not r.strip() for c, r, _ in pairs):
    return "empty_response"
  if any(c == r for c, r, _ in pairs):
    return "identical_pair"
  return Preference(prompt_turns, pairs)
