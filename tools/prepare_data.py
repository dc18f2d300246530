"""Prepare a pretraining corpus: clean, filter, deduplicate, scrub, tokenize, shard.

  python tools/prepare_data.py --config configs/data/stdlib.py --output runs/data
  python tools/prepare_data.py --input 'corpus/*.jsonl.gz' --input 'books/' --output runs/data \
      --vocab_size 8192
  python tools/prepare_data.py --show runs/data --n 3

The work is done by jaxlm.data.prepare; see README, "Preparing a corpus".
"""

import os
import re
import sys

from absl import app, flags

from jaxlm.cli import define_config_file, parse_flags
from jaxlm.data import prepare
from jaxlm.errors import ConfigError


_CONFIG = define_config_file("config", "configs/data/*.py[:arg]")  # locked
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the prepared corpus to.")
_INPUT = flags.DEFINE_multi_string("input", [], "A glob or directory: one source each "
                                   "(instead of --config).")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Pieces in the trained tokenizer.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a prepared corpus in --output.")
_SHOW = flags.DEFINE_string("show", None, "A prepared directory: print its kept documents.")
_N = flags.DEFINE_integer("n", None, "With --show: how many documents (all when omitted).")


def _source_name(pattern: str, taken) -> str:
  """A readable source name from a glob: its last part without wildcards or suffixes."""
  parts = [p for p in pattern.rstrip("/").split("/") if p]
  base = next((re.sub(r"[*?\[\]]", "", p) for p in reversed(parts)
               if re.sub(r"[*?\[\].]|py|txt|jsonl|gz|parquet", "", p)), "input")
  name = re.sub(r"[^A-Za-z0-9_-]+", "_", base.split(".")[0]).strip("_") or "input"
  candidate, i = name, 1
  while candidate in taken:
    i += 1
    candidate = f"{name}_{i}"
  return candidate


def config_from_flags():
  if _CONFIG.value is not None and _INPUT.value:
    raise app.UsageError("give --config or --input, not both")
  if _CONFIG.value is not None:
    c = _CONFIG.value
  elif _INPUT.value:
    c = prepare.default_config()
    for pattern in _INPUT.value:
      c.sources[_source_name(pattern, c.sources)] = prepare.source_config(pattern)
  else:
    raise app.UsageError("give --config, --input or --show")
  if _VOCAB.value is not None:
    c.tokenizer.vocab_size = _VOCAB.value
  return c


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if _SHOW.value:
      prepare.show(_SHOW.value, _N.value)
      return
    if not _OUTPUT.value:
      raise app.UsageError("--output is required")
    config = config_from_flags()
    stats = prepare.prepare(config, _OUTPUT.value, overwrite=_OVERWRITE.value)
  except (ConfigError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(prepare.summary(stats))
  print(f"wrote {os.path.join(_OUTPUT.value, prepare.MANIFEST)} and "
        f"{os.path.join(_OUTPUT.value, prepare.STATS)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
