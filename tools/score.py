"""Score a JSONL (or JSON) file with a trained reward model.

  python tools/score.py --model runs/reward_tiny --input prefs.jsonl --output scored.jsonl

Every record is written back with its rewards added:
  preference records (prompt/chosen/rejected, HH-RLHF dialogues, ranked responses)
      "reward_chosen" and "reward_rejected" for a pair; "rewards" (one per response,
      best first) for a ranking
  {"prompt", "completion"} (or "response"), strings or messages      "reward"
  {"messages": [...]} whose last turn is the assistant's               "reward"
Rewards are normalized when the run saved a normalization (reward.normalize_on), unless
--raw. Records that can't be scored are counted by reason with their first file:line
(--on_error=raise stops at the first).
"""

import collections
import json
import sys

from absl import app, flags

from jaxlm import console, fileio, reward_model, runs
from jaxlm.data import preference, sft
from jaxlm.errors import ConfigError


_MODEL = flags.DEFINE_string("model", None, "A reward run's workdir (or a checkpoint in it).")
_INPUT = flags.DEFINE_string("input", None, "Records to score: .jsonl or .json, gzip accepted.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the scored records (JSONL).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sequences per forward pass.")
_RAW = flags.DEFINE_bool("raw", False, "Rewards as the head gives them, not normalized.")
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "raise"],
                              "A record that can't be scored: count it, or stop.")
flags.mark_flags_as_required(["model", "input", "output"])


def to_items(record):
  """-> (prompt, [responses], kind) or a reason string."""
  if isinstance(record, dict) and ("chosen" in record or "responses" in record):
    pref = preference.to_preference(record)
    if isinstance(pref, str):
      return pref
    responses, _ = preference.responses_and_pairs(pref)
    return [{"role": r, "content": t} for r, t in pref.prompt], responses, (
        "ranked" if "responses" in record else "pair")
  if isinstance(record, dict) and "messages" in record:
    turns = sft.to_turns(record, "messages")
    if isinstance(turns, str):
      return turns
    messages = record["messages"]
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
      return "no_assistant_turn"
    return messages[:-1], [messages[-1]["content"]], "single"
  if isinstance(record, dict) and "prompt" in record and ("completion" in record
                                                          or "response" in record):
    prompt, answer = record["prompt"], record.get("completion", record.get("response"))
    if isinstance(answer, list):  # a conversational completion: one assistant message
      answer = preference.as_response(answer)
    if not isinstance(answer, str) or not isinstance(prompt, (str, list)):
      return "wrong_type"
    return prompt, [answer], "single"
  return "missing_field"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet()  # orbax's INFO lines and async tracebacks, unless --verbosity
  try:
    rm = runs.load_reward_model(_MODEL.value)
    records, items, skipped, first = [], [], collections.Counter(), {}
    for where, record in sft.read_records(_INPUT.value):
      item = record if isinstance(record, str) else to_items(record)
      if not isinstance(item, str):
        try:
          sequences = [reward_model.encode(rm, item[0], r) for r in item[1]]
        except (ValueError, KeyError, TypeError):
          item = "wrong_type"
      if isinstance(item, str):
        if _ON_ERROR.value == "raise":
          raise sft.DataError(f"{where}: {item} (--on_error=raise; 'skip' counts and goes on)")
        skipped[item] += 1
        first.setdefault(item, where)
        continue
      records.append(record)
      items.append((item[2], sequences))
  except (ConfigError, sft.DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

  flat = [s for _, sequences in items for s in sequences]
  scores = reward_model.score_tokens(rm, flat, batch_size=_BATCH.value, normalize=not _RAW.value)
  pos, correct, pairs = 0, 0, 0
  lines = []
  for record, (kind, sequences) in zip(records, items):
    mine = [float(x) for x in scores[pos:pos + len(sequences)]]
    pos += len(sequences)
    if kind == "pair":
      record.update(reward_chosen=mine[0], reward_rejected=mine[1])
      correct, pairs = correct + (mine[0] > mine[1]), pairs + 1
    elif kind == "ranked":
      record["rewards"] = mine
    else:
      record["reward"] = mine[0]
    lines.append(json.dumps(record) + "\n")
  fileio.atomic_write(_OUTPUT.value, "".join(lines))
  line = f"scored {len(records)} records ({len(flat)} responses) -> {_OUTPUT.value}"
  if flat:
    line += f"; reward mean {scores.mean():.4f}, std {scores.std():.4f}"
  if pairs:
    line += f"; chosen above rejected in {correct} of {pairs} pairs ({100 * correct / pairs:.1f}%)"
  if skipped:
    line += "; skipped " + ", ".join(f"{r}: {n} (first at {first[r]})" for r, n in skipped.items())
  print(line)


if __name__ == "__main__":
  app.run(main)
