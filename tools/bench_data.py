"""Data throughput: corpus preparation in MB/s of raw text, and the loader in tokens/s.

  python tools/bench_data.py                          # the Python standard library's .py files
  python tools/bench_data.py --input 'corpus/*.jsonl' --workers 2 --json out.json

Prepares the inputs with the default settings (every stage on: normalization, all
quality filters, exact and near dedup, PII, tokenizer training, tokenization), then
reads the prepared corpus through the training loader (mixture, packing, batching)
at two batch shapes. Compare the loader's tokens/s with the training step's on the
same machine (`tokens_per_s` in a run's metrics.jsonl): the loader must be far ahead.
"""

import glob
import json
import os
import shutil
import sysconfig
import tempfile
import time

from absl import app, flags

from jaxlm import fileio
from jaxlm.data import lm, prepare


_INPUT = flags.DEFINE_multi_string("input", None, "Globs to prepare (default: the standard "
                                   "library's .py files, recursively, without site-packages).")
_SPLIT = flags.DEFINE_enum("text_split", "file", ["file", "paragraph"], "Text files: one "
                           "document per file or per paragraph.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes; 0: one per core.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Tokenizer size.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Loader batches timed per shape.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")


def loader_tokens_per_s(directory, batch_size, seq_len, batches):
  """The loader as one training process builds it (pretraining on a prepared corpus):
  the mixture in data shards (data.shards=0, auto), packed, batched, one prefetch thread."""
  corpus = prepare.read_manifest(directory)
  weights = lm.mixture_weights(corpus, "", "train", "bench")

  def shard(index, count, rows, prefetch):
    return lm.mixture_dataset(directory, "train", weights, seq_len=seq_len, batch_size=rows,
                              seed=0, shuffle=True, repeat=True, process_index=index,
                              process_count=count, prefetch=prefetch)
  it = iter(lm.sharded(shard, batch_size=batch_size, shards=0, process_index=0,
                       process_count=1, prefetch=2))
  next(it)  # start-up (prefetch thread, first shard reads) is not steady state
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size * seq_len / (time.perf_counter() - t0)


def main(argv):
  del argv
  stdlib = sysconfig.get_paths()["stdlib"]
  patterns = _INPUT.value or [os.path.join(stdlib, "*.py")] + [
      os.path.join(d, "**", "*.py") for d in sorted(glob.glob(os.path.join(stdlib, "*", "")))
      if "site-packages" not in d and glob.glob(os.path.join(d, "**", "*.py"), recursive=True)]
  files = sorted({f for p in patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
  raw_bytes = sum(os.path.getsize(f) for f in files)
  c = prepare.default_config()
  for i, p in enumerate(patterns):
    c.sources[f"input_{i}"] = prepare.source_config(p, text_split=_SPLIT.value)
  c.workers = _WORKERS.value
  c.tokenizer.vocab_size = _VOCAB.value
  out = tempfile.mkdtemp(prefix="bench_data_")
  try:
    t0 = time.perf_counter()
    stats = prepare.prepare(c, out, progress=False)
    seconds = time.perf_counter() - t0
    result = {
        "files": len(files), "raw_mb": raw_bytes / 1e6, "workers": c.workers or os.cpu_count(),
        "prepare_seconds": seconds, "prepare_mb_per_s": raw_bytes / 1e6 / seconds,
        "phases_seconds": stats["total"]["seconds"], "documents_read": stats["total"]["read"],
        "documents_kept": stats["total"]["kept"], "tokens": stats["total"]["tokens"],
        "loader_tokens_per_s": {
            f"{b}x{t}": loader_tokens_per_s(out, b, t, _BATCHES.value)
            for b, t in ((16, 128), (8, 2048))},
    }
  finally:
    shutil.rmtree(out)
  print(json.dumps(result, indent=2))
  if _JSON.value:
    fileio.atomic_write_json(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)
