"""A two-source corpus from the Python standard library, prepared without any download.

  python tools/prepare_data.py --config configs/data/stdlib.py --output runs/data
  python -m jaxlm.launch --config configs/pretrain_tiny.py --workdir runs/tiny_mix \
      --config.data.train=runs/data --config.data.eval=runs/data

`modules` (the top-level modules) and `packages` (the modules inside packages) are
mixed 0.7 / 0.3 (shares of tokens). Both are code, so the prose-oriented Gopher filters
are off; normalization, deduplication and PII scrubbing apply. 5% of the kept documents
are held out as the eval split.
"""

import sysconfig

from jaxlm.data.prepare import default_config, source_config


def get_config(arg=None):
  del arg
  stdlib = sysconfig.get_paths()["stdlib"]
  c = default_config()
  code_filters = "none"  # code repeats lines by nature; dedup and PII still apply
  c.sources.modules = source_config(f"{stdlib}/*.py", weight=0.7, filters=code_filters)
  c.sources.packages = source_config(
      ",".join(f"{stdlib}/{p}/**/*.py" for p in ("email", "json", "http", "asyncio", "logging",
                                                 "xml", "importlib", "concurrent", "urllib")),
      weight=0.3, filters=code_filters)
  c.eval_fraction = 0.05
  c.tokenizer.vocab_size = 2048
  c.tokenizer.sample_chars = 2_000_000
  return c
