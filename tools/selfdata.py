r"""Data from the model itself (jaxlm.selfdata): `python tools/selfdata.py --mode MODE ...`.

  python tools/selfdata.py --mode best_of_n --model runs/sft_tiny --prompts prompts.jsonl \
      --n 8 --reward_fn overlap --out best.jsonl                      # rejection sampling -> SFT
  python tools/selfdata.py --mode pairs --model runs/sft_tiny --prompts prompts.jsonl \
      --n 4 --reward_model runs/reward_tiny --out pairs.jsonl         # RLAIF -> DPO / reward
  python tools/selfdata.py --mode pairs --model runs/sft_tiny --prompts prompts.jsonl \
      --n 2 --judge path/to/judge_model --out judged.jsonl            # a judge model labels
  python tools/selfdata.py --mode constitution --model runs/sft_tiny --prompts prompts.jsonl \
      --principles principles.txt --out revised.jsonl --pairs_out revised_pairs.jsonl

  best_of_n     sample N completions per prompt, keep the one the reward source scores
                highest: SFT JSONL (rejection sampling)
  pairs         sample N per prompt and label the best and worst by a reward source, or
                by a judge model asked which of two is better: preference JSONL (RLAIF)
  constitution  sample a response, have the model critique it against a principle drawn
                from a file, then revise it: SFT JSONL of the revisions, and with
                --pairs_out, preference pairs of revision over original

Prompts are RL prompt records (jaxlm.data.prompts: `prompt`, `question` or Alpaca
fields); the reward source is jaxlm.reward_fns' (--reward_fn, --reward_model). Records
are conversational, so SFT, reward and DPO read the outputs as they are. Every prompt
that yields nothing (a tie, an empty completion) is counted by reason and reported.
"""

import collections
import json
import sys

from absl import app, flags

from jaxlm import console, fileio, reward_fns, runs, selfdata
from jaxlm.data import prompts as prompts_lib
from jaxlm.errors import ConfigError, DataError


_MODE = flags.DEFINE_enum("mode", None, ["best_of_n", "pairs", "constitution"], "What to make.")
_MODEL = flags.DEFINE_string("model", None, "The model that samples (a jaxlm run or HF dir).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompt records (JSON/JSONL, gzip accepted).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSONL.")
_N = flags.DEFINE_integer("n", 4, "Completions sampled per prompt (best_of_n, pairs).")
_REWARD_FN = flags.DEFINE_string("reward_fn", "", "Reward functions, as config.reward.fn.")
_REWARD_MODEL = flags.DEFINE_string("reward_model", "", "A jaxlm reward run.")
_JUDGE = flags.DEFINE_string("judge", "", "pairs: a model asked which of two responses is "
                             "better (instead of a reward source).")
_PRINCIPLES = flags.DEFINE_string("principles", "", "constitution: a text file, one principle "
                                  "per paragraph.")
_PAIRS_OUT = flags.DEFINE_string("pairs_out", "", "constitution: also write revision-over-"
                                 "original preference pairs here.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N prompts (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Completions generated together.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens per completion at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def read_principles(path: str) -> list[str]:
  """The principles of a text file, one per paragraph (blank-line separated)."""
  if not path:
    raise ConfigError("--principles: constitution needs a file of principles")
  with open(path, encoding="utf-8") as f:
    principles = [p.strip() for p in f.read().split("\n\n") if p.strip()]
  if not principles:
    raise ConfigError(f"--principles: {path} holds no principle")
  return principles


def load_inputs():
  """What the flags name, loaded: (prompt records, the prompts used, sampler, reward
  source, judge, principles); a bad one ends the command with one line and exit 2."""
  for name, flag in (("mode", _MODE), ("model", _MODEL), ("prompts", _PROMPTS), ("out", _OUT)):
    if not flag.value:
      raise app.UsageError(f"--{name} is required")
  mode = _MODE.value
  try:
    policy = runs.load_lm(_MODEL.value)
    loaded = prompts_lib.load_prompts([_PROMPTS.value], on_error="skip")
    prompts = loaded.examples[:_LIMIT.value or None]
    sampler = selfdata.Sampler(policy, max_new_tokens=_MAX_NEW.value,
                               temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                               seed=_SEED.value, batch_size=_BATCH.value)
    source = judge = None
    if mode in ("best_of_n", "pairs") and not _JUDGE.value:
      source = reward_fns.Rewards(_REWARD_FN.value, _REWARD_MODEL.value)
    if mode == "pairs" and _JUDGE.value:
      judge = runs.load_lm(_JUDGE.value)
    principles = read_principles(_PRINCIPLES.value) if mode == "constitution" else []
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return loaded, prompts, sampler, source, judge, principles


def make_data():
  """Run the mode, write its JSONL (and --pairs_out's), print the counts in one line."""
  loaded, prompts, sampler, source, judge, principles = load_inputs()
  mode, pair_records = _MODE.value, []
  if mode == "best_of_n":
    records, skipped = selfdata.best_of_n(prompts, sampler, source, _N.value)
  elif mode == "pairs":
    records, skipped = selfdata.pairs(prompts, sampler, _N.value, source=source, judge=judge)
  else:
    records, pair_records, skipped = selfdata.constitution(prompts, sampler, principles,
                                                           _SEED.value)
  counts = collections.Counter(records=loaded.counts["records"], prompts=len(prompts))
  counts.update({k: v for k, v in loaded.counts.items() if k.startswith("skipped_")})
  counts.update(skipped)
  for path, rows in ((_OUT.value, records), (_PAIRS_OUT.value, pair_records)):
    if path:
      fileio.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
  counts["written"] = len(records)
  line = f"{mode}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {_OUT.value}"
  if _PAIRS_OUT.value:
    line += f"; {len(pair_records)} pairs -> {_PAIRS_OUT.value}"
  if loaded.first:
    line += "; first skipped at " + ", ".join(f"{r}: {w}" for r, w in loaded.first.items())
  print(line)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet()  # orbax's INFO lines and async tracebacks, unless --verbosity
  try:
    make_data()
  except (ConfigError, DataError, OSError, ValueError) as e:  # a file, a record, a key
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
