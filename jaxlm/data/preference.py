"""Preference records -> a prompt (conversation turns) and (chosen, rejected, margin) pairs.

Formats, detected by their fields (TRL's conventions where they exist):

    explicit   {"prompt", "chosen", "rejected"}: strings, or lists of messages
    implicit   {"chosen", "rejected"}: whole conversations sharing their prompt, as message
               lists or as Anthropic HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...")
    ranked     {"prompt", "responses"}: responses best first, expanded to every pair, the
               prompt kept once (InstructGPT's K-way rankings)

with an optional numeric "margin" per record (finite: within float32's range). A record
that can't be used comes back as a reason string, to be raised or counted with its file
and line like SFT's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re

import grain
import numpy as np

from jaxlm.data import sft


ROLES = ("system", "user", "assistant")
_MAX_MARGIN = float(np.finfo(np.float32).max)  # margins train as float32
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


def as_response(value) -> str | None:
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
  if margin is not None and not abs(margin) <= _MAX_MARGIN:  # NaN, inf, or past float32
    return "wrong_value"
  if "responses" in record:
    if "prompt" not in record:
      return "missing_field"
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
      return "wrong_type"
    responses = [as_response(r) for r in responses]
    pairs = [(a, b, margin) for a, b in itertools.combinations(responses, 2)]
  elif "chosen" in record and "rejected" in record:
    if "prompt" in record:
      chosen, rejected = as_response(record["chosen"]), as_response(record["rejected"])
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


# ---------------------------------------------------------------------------------------
# Tokens: each response once after its prompt; pairs index the responses of their record.


def responses_and_pairs(pref: Preference) -> tuple[list[str], list[tuple[int, int, float]]]:
  """The distinct responses of a record, and its pairs as (chosen, rejected, margin)
  indices into them: K ranked responses are K sequences, not K(K-1) of them."""
  responses: list[str] = []
  index = {}
  pairs = []
  for chosen, rejected, margin in pref.pairs:
    for text in (chosen, rejected):
      if text not in index:
        index[text] = len(responses)
        responses.append(text)
    pairs.append((index[chosen], index[rejected], float(margin or 0.0)))
  return responses, pairs


def tokenize_group(pref: Preference, tok, template, *, max_ids: int, truncation: str):
  """A record -> ({"ids", "supervised": one array per response, "pairs", "margins"},
  whether a response was truncated); or the reason it was dropped.

  Each sequence is BOS, the prompt rendered with the chat template, then the response
  as the assistant's turn (its end marker included), encoded whole as at inference;
  `supervised` marks the response. Sequences over `max_ids` lose their end (or, with
  truncation="drop", drop the record); a record where a response would be cut away
  entirely is dropped."""
  responses, pairs = responses_and_pairs(pref)
  prompt = [(role, text, False) for role, text in pref.prompt]
  out = {"ids": [], "supervised": []}
  truncated = False
  for text in responses:
    tokenized = sft.tokenize(prompt + [("assistant", text, True)], True, tok, template,
                             "completion")
    if isinstance(tokenized, str):
      return tokenized
    ids, sup = tokenized
    if len(ids) > max_ids:
      if truncation == "drop":
        return "dropped_too_long"
      if not sup[:max_ids].any():
        return "dropped_truncated_away"
      ids, sup, truncated = ids[:max_ids], sup[:max_ids], True
    out["ids"].append(ids)
    out["supervised"].append(sup)
  out["pairs"] = np.asarray([(i, j) for i, j, _ in pairs], np.int32)
  out["margins"] = np.asarray([m for _, _, m in pairs], np.float32)
  return out, truncated


def load_groups(files: list[str], tok, template, *, max_ids: int, truncation: str,
                on_error: str, max_bytes: int = sft.MAX_RECORD_BYTES):
  """Every record of `files` -> tokenized groups, counted like SFT's examples (records,
  used, pairs, skipped_<reason>, truncated, dropped_*), with where each reason first
  occurred."""
  out = sft.Examples()
  for path in files:
    for where, record in sft.read_records(path, max_bytes):
      out.counts["records"] += 1
      pref = record if isinstance(record, str) else to_preference(record)
      group = pref if isinstance(pref, str) else tokenize_group(
          pref, tok, template, max_ids=max_ids, truncation=truncation)
      if isinstance(group, str):
        out.skip(where, group, on_error)
        continue
      group, truncated = group
      out.counts["truncated"] += truncated
      out.counts["used"] += 1
      out.counts["pairs"] += len(group["pairs"])
      out.examples.append(group)
  return out


def group_size(*example_lists) -> int:
  """The most responses any record has: the fixed number of sequences per batch row."""
  return max((len(ex["ids"]) for examples in example_lists for ex in examples), default=2)


def pad_group(ex: dict, group: int, seq_len: int, shifted: bool) -> dict:
  """A record's sequences as fixed [group, seq_len] arrays (padding rows are segment 0)
  and its pairs as [group * (group - 1) / 2] with a validity mask. `shifted`: tokens are
  ids[:-1] with next-token targets and the response mask over them (for log-probs);
  otherwise tokens are the ids themselves (for a reward read at the last one)."""
  num_pairs = group * (group - 1) // 2
  tokens = np.zeros((group, seq_len), np.int32)
  segments = np.zeros((group, seq_len), np.int32)
  positions = np.zeros((group, seq_len), np.int32)
  out = {"tokens": tokens, "segment_ids": segments, "positions": positions}
  if shifted:
    out["targets"] = np.zeros((group, seq_len), np.int32)
    out["loss_mask"] = np.zeros((group, seq_len), np.int32)
  for g, (ids, sup) in enumerate(zip(ex["ids"], ex["supervised"])):
    if shifted:
      ids, targets, sup = ids[:-1], ids[1:], sup[1:]
      out["targets"][g, :len(ids)] = targets
      out["loss_mask"][g, :len(ids)] = sup
    n = len(ids)
    tokens[g, :n] = ids
    segments[g, :n] = 1
    positions[g, :n] = np.arange(n)
  k = len(ex["pairs"])
  pairs = np.zeros((num_pairs, 2), np.int32)
  pairs[:k] = ex["pairs"]
  margins = np.zeros(num_pairs, np.float32)
  margins[:k] = ex["margins"]
  valid = np.zeros(num_pairs, np.float32)
  valid[:k] = 1.0
  out.update(pairs=pairs, margins=margins, pair_mask=valid)
  if "reference_logps" in ex:  # precomputed by the DPO task
    ref = np.zeros(group, np.float32)
    ref[:len(ex["reference_logps"])] = ex["reference_logps"]
    out["reference_logps"] = ref
  return out


def preference_dataset(examples: list, *, group: int, seq_len: int, shifted: bool,
                       batch_size: int, seed: int, shuffle: bool, repeat: bool = True,
                       process_index: int = 0, process_count: int = 1, prefetch: int = 0):
  """Batches of records: [batch, group, seq_len] sequences plus [batch, pairs] indices."""
  ds = sft.record_stream(grain.MapDataset.source(examples), seed=seed, shuffle=shuffle,
                         repeat=repeat, process_index=process_index,
                         process_count=process_count)
  ds = ds.map(lambda ex: pad_group(ex, group, seq_len, shifted))
  ds = ds.batch(batch_size, drop_remainder=True)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds
