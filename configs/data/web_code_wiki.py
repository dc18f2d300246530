"""A template for a real pretraining mixture: web 0.6, code 0.25, wiki 0.15.

Point each source at your files (globs or directories; .txt, .jsonl[.gz], .parquet) or
at a TFDS dataset prepared on disk, then run:

  python tools/prepare_data.py --config configs/data/web_code_wiki.py --output data/mix \
      --config.sources.web.path='crawl/*.jsonl.gz' \
      --config.sources.code.path='code/' \
      --config.sources.wiki.path='tfds:wikipedia/20230601.en:train'

Web text goes through every quality filter, code through none (code repeats lines by
nature), wiki through the length and repetition filters. Near duplicates are removed across all
three (the first copy in source order is kept).
"""

from jaxlm.data.prepare import default_config, source_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.sources.web = source_config("", weight=0.6, filters="all")
  c.sources.code = source_config("", weight=0.25, filters="none")
  c.sources.wiki = source_config("", weight=0.15,
                                 filters="word_count,repeated_lines,repeated_ngrams")
  c.eval_fraction = 0.001
  c.tokenizer.vocab_size = 32000
  c.tokenizer.sample_chars = 200_000_000
  return c
