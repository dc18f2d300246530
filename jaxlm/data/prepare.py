"""Corpus preparation: read -> normalize -> filter -> scrub -> deduplicate -> tokenize -> shards.

    prepare(config, output_dir) -> stats

Every source is streamed once. Worker processes decode, normalize, filter, scrub and
sign documents; the main process decides duplicates in input order (so the result does
not depend on the number of workers) and writes the kept text to ArrayRecord shards. A
tokenizer is then trained on a sample of the kept text (or an existing one is used), and
the workers tokenize the text shards into token shards. The output directory:

    prepared.json        sources, weights, shard files, token dtype (what training reads)
    stats.json           per source and in total: read, kept, removed{reason}, chars, tokens
    tokenizer.model/.vocab
    <source>/train-00000-of-00004.array_record   one record per document: its token ids
    <source>/eval-...                            when eval_fraction > 0

Every document read is kept or removed for exactly one reason: read = kept + removed.

Preparation writes only the files it names above and removes only files an earlier
preparation wrote (those its manifest lists, or a stopped run's .prepare-pending.json);
the output may not overlap an input. prepared.json is written last, atomically, so a
killed run never leaves a manifest pointing at partial shards.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent import futures
import contextlib
import ctypes
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time

from array_record.python import array_record_module as ar
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxlm import console, fileio
from jaxlm.data import clean, dedup, tokenizer as tokenizer_lib
from jaxlm.data.sources import (READ_ERRORS, TFDS_PREFIX, TfdsDocuments, bounded_lines, file_format,
                                is_text, text_documents, too_long)
from jaxlm.errors import ConfigError
from jaxlm.fileio import expand_globs


MANIFEST = "prepared.json"
STATS = "stats.json"
PENDING = ".prepare-pending.json"  # the files a preparation in progress writes; gone when done
# Reasons that mean the record itself is broken (as opposed to filtered or duplicated);
# with on_error="fail" the first of these stops the run.
RECORD_ERRORS = ("decode_error", "invalid_json", "missing_field", "wrong_type", "read_error",
                 "too_long")
_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".py": "text",
             ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet"}


def source_config(path: str = "", **overrides) -> ml_collections.ConfigDict:
  """One input source: where it is, how to read it, how to clean it, its mixture weight."""
  s = ml_collections.ConfigDict()
  s.path = path                 # comma-separated globs or directories, or tfds:NAME[:VERSION]:SPLIT
  s.format = "auto"             # "auto" (by extension) | "text" | "jsonl" | "parquet"
  s.text_field = "text"         # JSONL / Parquet / TFDS field holding the document
  s.text_split = "file"         # text files: "file" (one document each) | "paragraph"
  s.weight = 1.0                # default mixture weight, recorded for training
  s.filters = "all"             # quality filters: "all" | "none" | comma-separated names
  s.pii = True                  # scrub PII in this source
  for k, v in overrides.items():
    setattr(s, k, v)
  return s


def default_config() -> ml_collections.ConfigDict:
  """Defaults for `tools/prepare_data.py`. Configs under configs/data/ start here."""
  c = ml_collections.ConfigDict()
  c.sources = ml_collections.ConfigDict()   # name -> source_config(...)
  c.workers = 0                 # worker processes; 0: one per CPU core
  c.shards = 4                  # shards per source and split
  c.on_error = "skip"           # broken records: "skip" (count, report file:line) | "fail"
  c.on_decode_error = "skip"    # invalid UTF-8: "skip" (count as decode_error) | "repair" (U+FFFD)
  c.eval_fraction = 0.0         # share of kept documents held out as the eval split (by hash)
  c.seed = 0                    # MinHash permutations and the held-out split
  c.keep_text = False           # also keep the cleaned text shards (<source>/text-*)
  c.tfds_data_dir = ""          # where tfds: sources are prepared; empty: TFDS's default
  c.max_record_bytes = 1 << 24  # a document (JSONL line, text file or paragraph, Parquet or
                                # TFDS value) over this is removed as too_long, never read whole

  c.normalize = ml_collections.ConfigDict()
  c.normalize.nfc = True        # Unicode NFC
  c.normalize.control_chars = True  # drop control characters other than tab and newline
  c.normalize.whitespace = True     # CRLF -> LF, trailing spaces, blank-line runs, ends

  c.filters = ml_collections.ConfigDict()  # thresholds; each source picks which apply
  c.filters.min_words = 50
  c.filters.max_words = 100_000
  c.filters.min_mean_word_length = 3.0
  c.filters.max_mean_word_length = 10.0
  c.filters.max_symbol_ratio = 0.1        # ('#' + ellipses) per word
  c.filters.min_punctuation_lines = 0.1   # share of non-empty lines ending in . ! ? " ' : ; )
  c.filters.max_duplicate_lines = 0.3     # share of non-empty lines that occur more than once
  c.filters.max_top_2gram = 0.2           # chars in the most frequent word 2-gram
  c.filters.max_duplicate_5grams = 0.15   # chars in word 5-grams that occur more than once
  c.filters.min_alpha_words = 0.8         # share of words with an alphabetic character

  c.dedup = ml_collections.ConfigDict()
  c.dedup.exact = True          # drop documents whose text was already kept (any source)
  c.dedup.near = True           # MinHash + LSH near-duplicate removal
  c.dedup.ngram = 5             # word n-gram shingles
  c.dedup.num_perm = 128        # MinHash permutations
  c.dedup.threshold = 0.8       # estimated Jaccard similarity at which a document is a duplicate

  c.pii = ml_collections.ConfigDict()  # placeholders; empty leaves that kind alone
  c.pii.email = "<|email|>"
  c.pii.phone = "<|phone|>"
  c.pii.ip = "<|ip|>"

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""         # an existing SentencePiece .model; empty: train one
  c.tokenizer.vocab_size = 32000
  c.tokenizer.model_type = "bpe"  # "bpe" | "unigram"
  c.tokenizer.sample_chars = 20_000_000  # kept text it is trained on, shared by source weight
  c.tokenizer.special_tokens = ",".join(tokenizer_lib.SPECIAL_TOKENS)  # plus the PII placeholders
  return c


# ---------------------------------------------------------------------------------------
# Reading: every source as a stream of (where, kind, payload) records.


def _format(path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  for suffix, kind in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
    if path.endswith(suffix):
      return kind
  return file_format(path)


def _text_records(path: str, split: str, max_bytes: int):
  with open(path, "rb") as f:
    for _, _, line, raw in text_documents(f, split, max_bytes):
      yield f"{path}:{line}", "bytes" if raw is not None else "too_long", raw


def _jsonl_records(path: str, max_bytes: int):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for lineno, (_, _, line) in enumerate(bounded_lines(f, max_bytes), 1):
      if line is None:
        yield f"{path}:{lineno}", "too_long", None
      elif line.strip():
        yield f"{path}:{lineno}", "json", line


def _parquet_records(path: str, field: str, max_bytes: int):
  import pyarrow.parquet as pq  # lazy: only for Parquet sources
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise ConfigError(f"text_field={field!r}: no such column in {path} "
                      f"(columns: {', '.join(pf.schema_arrow.names)})")
  row = 0
  for batch in pf.iter_batches(columns=[field], batch_size=1024):
    for value in batch.column(0).to_pylist():
      row += 1
      yield f"{path}:row {row}", *_value(value, max_bytes)


def _value(value, max_bytes: int) -> tuple[str, object]:
  """(kind, payload) of a value read whole by its library (Parquet, TFDS)."""
  return ("too_long", None) if too_long(value, max_bytes) else ("value", value)


def read_source(src, key: str, tfds_data_dir: str = "",
                max_bytes: int = 1 << 24) -> Iterator[tuple[str, str, object]]:
  """(where, kind, payload) for every record of a source, streamed in a fixed order; a
  record over `max_bytes` is ("too_long", None), never read whole where the format allows."""
  if src.path.strip().startswith(TFDS_PREFIX):
    docs = TfdsDocuments(src.path.strip(), src.text_field, tfds_data_dir, name=f"{key}.path",
                         field_key=f"{key}.text_field")
    for i in range(len(docs)):  # checked here, by this policy
      yield f"{src.path.strip()}[{i}]", *_value(docs.raw(i), max_bytes)
    return
  for path in expand_globs(src.path, f"{key}.path"):
    kind = _format(path, src.format)
    last = f"{path}:1"
    try:
      if kind == "jsonl":
        records = _jsonl_records(path, max_bytes)
      elif kind == "parquet":
        records = _parquet_records(path, src.text_field, max_bytes)
      else:
        records = _text_records(path, src.text_split, max_bytes)
      for record in records:
        last = record[0]
        yield record
    except READ_ERRORS as e:  # a truncated or corrupt gzip, an unreadable file: the rest is lost
      yield f"{last} (and after)", "read_error", f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------
# Per-document work, in worker processes.

_WORKER: dict = {}


def _init_worker(settings: dict):
  _die_with_parent(settings["parent"])
  _WORKER.clear()
  _WORKER.update(settings)
  _WORKER["perms"] = dedup.permutations(settings["num_perm"], settings["seed"])


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
  """A worker of a parent killed with SIGKILL (whose pool never shuts down) dies too: on
  Linux the kernel sends it SIGKILL; elsewhere a thread watches the parent's pid."""
  armed = False
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:  # the parent died before that was armed
    os._exit(1)
  if not armed:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)


def _decode(kind, payload, field):
  """-> (text, None, repaired) or (None, reason, False)."""
  if kind in ("read_error", "too_long"):
    return None, kind, False
  repair = _WORKER["on_decode_error"] == "repair"
  repaired = False
  if kind == "bytes":
    try:
      return payload.decode("utf-8"), None, False
    except UnicodeDecodeError:
      if not repair:
        return None, "decode_error", False
      return payload.decode("utf-8", errors="replace"), None, True
  if kind == "json":
    try:
      record = json.loads(payload)
    except UnicodeDecodeError:
      if not repair:
        return None, "decode_error", False
      repaired = True
      try:
        record = json.loads(payload.decode("utf-8", errors="replace"))
      except (ValueError, RecursionError):
        return None, "invalid_json", False
    except (ValueError, RecursionError):  # too deep, or an integer too long: not usable JSON
      return None, "invalid_json", False
    if not isinstance(record, dict) or field not in record:
      return None, "missing_field", False
    payload = record[field]
  if payload is None:
    return None, "missing_field", False
  if isinstance(payload, bytes):
    return _decode("bytes", payload, field)
  if not isinstance(payload, str):
    return None, "wrong_type", False
  if not is_text(payload):  # JSON may carry lone surrogates ("\ud800"), which are not text
    if not repair:
      return None, "decode_error", False
    payload, repaired = payload.encode("utf-8", errors="replace").decode("utf-8"), True
  return payload, None, repaired


def _process(item):
  """One record -> (where, reason or None, text, hash, signature, pii counts, repaired)."""
  where, kind, payload, field, filter_names, pii = item
  text, reason, repaired = _decode(kind, payload, field)
  if reason == "decode_error" and kind == "bytes":  # name the bad line, not the first
    path, _, line = where.rpartition(":")
    try:
      payload.decode("utf-8")
    except UnicodeDecodeError as e:
      bad_line = int(line) + payload.count(b"\n", 0, e.start)
      where = f"{path}:{bad_line}"
  if reason:
    return where, reason, None, None, None, {}, False
  text = clean.normalize(text, _WORKER["normalize"])
  if not text:
    return where, "empty", None, None, None, {}, repaired
  reason = clean.first_failed_filter(text, filter_names, _WORKER["filters"])
  if reason:
    return where, reason, None, None, None, {}, repaired
  counts = {}
  if pii:
    text, counts = clean.scrub_pii(text, _WORKER["pii"])
  signature = (dedup.minhash(text, _WORKER["ngram"], _WORKER["perms"])
               if _WORKER["near"] else None)
  return where, None, text, dedup.content_hash(text), signature, counts, repaired


def _process_chunk(items):
  if os.environ.get("JAXLM_FAILPOINT") == "prepare:worker":  # tests/faults: a worker that is
    time.sleep(3600)                                         # busy until its parent dies
  return [_process(item) for item in items]


CHUNK = 64  # records per task sent to a worker


def _chunks(records, src, filter_names, size=None):
  size = size or CHUNK
  chunk = []
  for where, kind, payload in records:
    chunk.append((where, kind, payload, src.text_field, filter_names, src.pii))
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _tokenize_shard(job):
  """Worker: a text shard -> a token shard; returns (documents, tokens)."""
  text_path, token_path, tokenizer_path, dtype = job
  tok = tokenizer_lib.Tokenizer(tokenizer_path)
  reader = ar.ArrayRecordReader(text_path)
  writer = ar.ArrayRecordWriter(token_path, "group_size:1")
  docs = tokens = 0
  for start in range(0, reader.num_records(), 256):
    batch = reader.read(list(range(start, min(start + 256, reader.num_records()))))
    for ids in tok.sp.encode([b.decode("utf-8") for b in batch]):
      writer.write(np.asarray(ids, dtype).tobytes())
      docs, tokens = docs + 1, tokens + len(ids)
  writer.close()
  reader.close()
  return docs, tokens


# ---------------------------------------------------------------------------------------
# The pipeline.


def _ordered_map(pool, fn, items, window: int):
  """`pool.map` in input order with at most `window` items in flight, so a stream is
  never read far ahead of the workers (memory stays bounded)."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


class _Stats:
  def __init__(self):
    self.read = self.kept = self.chars = self.tokens = self.repaired = 0
    self.removed = collections.Counter()
    self.first = {}
    self.pii = collections.Counter()

  def remove(self, reason, where):
    self.removed[reason] += 1
    self.first.setdefault(reason, where)

  def as_dict(self):
    return {"read": self.read, "kept": self.kept, "removed": dict(sorted(self.removed.items())),
            "chars": self.chars, "tokens": self.tokens, "pii": dict(sorted(self.pii.items())),
            "repaired": self.repaired, "first_at": dict(sorted(self.first.items()))}


def check_config(c, output: str | None = None) -> None:
  """One-line ConfigErrors naming the key, before anything is read; with `output`, also
  that the output overlaps no input (`check_output`)."""
  if not c.sources:
    raise ConfigError("sources: empty; add one (--input GLOB, or sources.NAME.path in a config)")
  choices = {"on_error": ("skip", "fail"), "on_decode_error": ("skip", "repair"),
             "tokenizer.model_type": ("bpe", "unigram")}
  for key, allowed in choices.items():
    node = c
    for part in key.split("."):
      node = node[part]
    if node not in allowed:
      raise ConfigError(f"{key}={node!r}: must be one of {', '.join(allowed)}")
  for name, s in c.sources.items():
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
      raise ConfigError(f"sources.{name}: a source name may hold letters, digits, _ . - only")
    if not s.path.strip():
      raise ConfigError(f"sources.{name}.path: empty")
    if s.format not in ("auto", "text", "jsonl", "parquet"):
      raise ConfigError(f"sources.{name}.format={s.format!r}: must be one of auto, text, "
                        f"jsonl, parquet")
    if s.text_split not in ("file", "paragraph"):
      raise ConfigError(f"sources.{name}.text_split={s.text_split!r}: must be file or paragraph")
    if not s.weight >= 0:
      raise ConfigError(f"sources.{name}.weight={s.weight}: must be >= 0")
    try:
      clean.parse_filter_names(s.filters, f"sources.{name}.filters")
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if not 0.0 <= c.eval_fraction < 1.0:
    raise ConfigError(f"eval_fraction={c.eval_fraction}: must be in [0, 1)")
  if c.shards < 1 or c.workers < 0:
    raise ConfigError("shards must be >= 1 and workers >= 0")
  if not c.max_record_bytes >= 1:
    raise ConfigError(f"max_record_bytes={c.max_record_bytes}: must be >= 1")
  if not 0.0 < c.dedup.threshold <= 1.0:
    raise ConfigError(f"dedup.threshold={c.dedup.threshold}: must be in (0, 1]")
  for key in ("dedup.ngram", "dedup.num_perm", "tokenizer.vocab_size"):
    value = c.dedup[key.split(".")[1]] if key.startswith("dedup") else c.tokenizer.vocab_size
    if value < 1:
      raise ConfigError(f"{key}={value}: must be >= 1")
  for name, s in c.sources.items():  # every path resolves before anything is read
    if not s.path.strip().startswith(TFDS_PREFIX):
      expand_globs(s.path, f"sources.{name}.path")
  if c.tokenizer.path and not os.path.isfile(c.tokenizer.path):
    raise ConfigError(f"tokenizer.path: no such file {c.tokenizer.path!r}")
  if output is not None:
    check_output(c, output)


def check_output(c, output: str) -> None:
  """The output may not be an input folder (a directory given, or the folder a `**`
  pattern recurses from), a parent or a child of one, nor hold an input file: preparing
  writes there, and --overwrite removes. A one-line ConfigError naming the key."""
  def refuse(key, what):
    raise ConfigError(f"--output {output}: {what} ({key}); preparing writes there and "
                      f"--overwrite removes there: choose an --output apart from the inputs")
  for name, s in c.sources.items():
    key = f"sources.{name}.path"
    if s.path.strip().startswith(TFDS_PREFIX):
      if c.tfds_data_dir and fileio.overlaps(c.tfds_data_dir, output):
        refuse("tfds_data_dir", f"overlaps the TFDS folder {c.tfds_data_dir}")
      continue
    for pattern in [p.strip() for p in s.path.split(",") if p.strip()]:
      root = fileio.glob_roots(pattern)
      if root is not None and fileio.overlaps(root, output):
        refuse(key, f"overlaps the input folder {root}")
    for path in expand_globs(s.path, key):
      if fileio.is_within(path, output):
        refuse(key, f"holds the input file {path}")
  if c.tokenizer.path and fileio.is_within(c.tokenizer.path, output):
    refuse("tokenizer.path", f"holds the input file {c.tokenizer.path}")


def _is_heldout(digest: bytes, fraction: float, seed: int) -> bool:
  """A fixed share of documents, chosen by content hash: the same text is always on
  the same side, whatever the order or number of workers."""
  if fraction <= 0:
    return False
  value = int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=str(seed).encode()).digest(),
                         "big")
  return value / 2**64 < fraction


def _token_shard(text_shard: str) -> str:
  """<source>/text-train-00000-of-00004.array_record -> <source>/train-00000-of-00004..."""
  folder, base = os.path.split(text_shard)
  return os.path.join(folder, base[len("text-"):])


def _shard(split: str, i: int, n: int) -> str:
  return f"{split}-{i:05d}-of-{n:05d}.array_record"


def _planned(c) -> set[str]:
  """The files (relative to the output) this preparation will write."""
  splits = ("train", "eval") if c.eval_fraction > 0 else ("train",)
  files = {MANIFEST, STATS, "tokenizer.model"}
  if not c.tokenizer.path:
    files.add("tokenizer.vocab")  # tokenizer.train writes it beside the model
  for name in c.sources:
    for sp in splits:
      for i in range(c.shards):
        files |= {f"{name}/{_shard(sp, i, c.shards)}", f"{name}/text-{_shard(sp, i, c.shards)}"}
  return files


def _manifest_files(manifest: dict) -> set[str]:
  """The files (relative to the output) the preparation that wrote `manifest` wrote:
  its shards and their text shards (kept or not), the tokenizer, stats and itself."""
  tokenizer = manifest["tokenizer"]
  files = {MANIFEST, STATS, tokenizer, os.path.splitext(tokenizer)[0] + ".vocab"}
  for name, source in manifest["sources"].items():
    for split in source["splits"].values():
      files |= {f"{name}/{f}" for shard in split["shards"] for f in (shard, f"text-{shard}")}
  return files


def _pending_files(path: str) -> set[str]:
  """What a stopped preparation said it would write (its .prepare-pending.json)."""
  try:
    record = fileio.read_json(path)
    files = record["files"] if isinstance(record, dict) else None
    if not isinstance(files, list):
      raise ValueError(f"{path}: no list of files")
    for rel in files:
      parts = rel.split("/") if isinstance(rel, str) else [rel]
      if len(parts) > 2:
        raise ValueError(f"{path}: {rel!r} is not a file a preparation writes")
      for part in parts:
        fileio.check_name(part, f"{path}: a file")
  except ValueError as e:
    raise ConfigError(f"{e}; remove it and what it lists by hand") from None
  return set(files)


def _clear(output: str, owned: set[str]) -> None:
  """Remove the files of `owned` (an earlier preparation's) and the temporary files a
  killed atomic write of one of them left (`.NAME.*.tmp`), then each of its source folders
  that is left empty; nothing else, and nothing outside `output`."""
  for rel in sorted(owned):
    path = os.path.join(output, rel)
    if os.path.isdir(path) and not os.path.islink(path):
      raise ConfigError(f"--output {output}: {path} is a folder where a preparation writes a "
                        f"file; move it away")
    folder, base = os.path.split(path)
    leftovers = glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*.tmp"))
    for p in [path] * os.path.lexists(path) + sorted(leftovers):
      fileio.remove_inside(p, output)
  for folder in sorted({rel.split("/")[0] for rel in owned if "/" in rel}):
    path = os.path.join(output, folder)
    if (os.path.isdir(path) and not os.path.islink(path) and fileio.is_within(path, output)
        and not os.listdir(path)):
      os.rmdir(path)


def _make_room(c, output: str, overwrite: bool) -> set[str]:
  """Check that this preparation replaces only files an earlier one wrote, remove those,
  and record what it will write (PENDING). Returns the files it will write."""
  owned = set()  # what earlier preparations here wrote: the only files that may go
  if os.path.exists(os.path.join(output, MANIFEST)):
    if not overwrite:
      raise ConfigError(f"--output {output}: already holds a prepared corpus; pass --overwrite "
                        f"or choose another directory")
    owned |= _manifest_files(read_manifest(output))
  if os.path.exists(os.path.join(output, PENDING)):  # a run that was stopped part way
    owned |= _pending_files(os.path.join(output, PENDING)) | {PENDING}
  planned = _planned(c)
  owned_folders = {rel.split("/")[0] for rel in owned if "/" in rel}
  for name in c.sources:
    folder = os.path.join(output, name)
    if os.path.lexists(folder) and name not in owned_folders and (
        not os.path.isdir(folder) or os.listdir(folder)):
      raise ConfigError(f"--output {output}: {folder} exists and was not written by a "
                        f"preparation; choose another --output or source name")
  for rel in sorted(planned):
    path = os.path.join(output, rel)
    if not fileio.is_within(path, output):  # a link out of the output
      raise ConfigError(f"--output {output}: {path} leads outside it")
    if os.path.lexists(path) and rel not in owned:
      raise ConfigError(f"--output {output}: {path} exists and was not written by a "
                        f"preparation; move it away or choose another directory")
  _clear(output, owned - {PENDING})
  fileio.atomic_write_json(os.path.join(output, PENDING), {"version": 1,
                                                           "files": sorted(planned)})
  return planned


# The stages in order (read, clean, dedup, tokenize, shard, stats) share one accounting.
# long: each stage is a few lines; splitting them would pass that accounting around
def prepare(c, output: str, *, overwrite: bool = False, progress: bool | None = None) -> dict:
  """Run the whole preparation; returns the stats that also go to `output/stats.json`."""
  check_config(c, output)
  if os.path.exists(output) and not os.path.isdir(output):
    raise ConfigError(f"--output {output}: exists and is not a directory")
  os.makedirs(output, exist_ok=True)
  _make_room(c, output, overwrite)
  workers = c.workers or os.cpu_count() or 1
  settings = {"normalize": c.normalize.to_dict(), "filters": c.filters.to_dict(),
              "pii": c.pii.to_dict(), "ngram": c.dedup.ngram, "num_perm": c.dedup.num_perm,
              "seed": c.seed, "near": c.dedup.near, "on_decode_error": c.on_decode_error,
              "parent": os.getpid()}
  exact_seen: set[bytes] = set()
  near_index = dedup.NearDuplicateIndex(c.dedup.num_perm, c.dedup.threshold)
  total_weight = sum(s.weight for s in c.sources.values()) or 1.0
  splits = ("train", "eval") if c.eval_fraction > 0 else ("train",)
  stats: dict[str, _Stats] = {}
  sample: list[str] = []
  text_shards: dict[str, dict[str, list[str]]] = {}

  seconds = {}
  t0 = time.perf_counter()
  # spawn, not fork: the caller may hold JAX's threads. A worker that dies breaks the pool
  # with an error instead of a hang.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(settings,)) as pool:
    for name, src in c.sources.items():
      st = stats[name] = _Stats()
      filter_names = clean.parse_filter_names(src.filters, f"sources.{name}.filters")
      os.makedirs(os.path.join(output, name), exist_ok=True)
      paths = {sp: [os.path.join(output, name, f"text-{_shard(sp, i, c.shards)}")
                    for i in range(c.shards)] for sp in splits}
      text_shards[name] = paths
      writers = {sp: [ar.ArrayRecordWriter(p, "group_size:1") for p in paths[sp]] for sp in splits}
      written = dict.fromkeys(splits, 0)
      sample_budget = c.tokenizer.sample_chars * src.weight / total_weight
      sampled = 0
      bar = tqdm(desc=f"{name}", unit=" docs", disable=not progress if progress is not None
                 else None, dynamic_ncols=True)
      records = read_source(src, f"sources.{name}", c.tfds_data_dir, c.max_record_bytes)
      chunks = _chunks(records, src, filter_names)
      for results in _ordered_map(pool, _process_chunk, chunks, 4 * workers):
        for where, reason, text, digest, signature, pii_counts, repaired in results:
          st.read += 1
          st.repaired += repaired
          if reason is None and c.dedup.exact and digest in exact_seen:
            reason = "exact_duplicate"
          if reason is None and c.dedup.near and not near_index.add_if_new(signature):
            reason = "near_duplicate"
          if reason is not None:
            if c.on_error == "fail" and reason in RECORD_ERRORS:
              raise ValueError(f"{where}: {reason} (sources.{name}; on_error=fail)")
            st.remove(reason, where)
            continue
          if c.dedup.exact:
            exact_seen.add(digest)
          st.kept += 1
          st.chars += len(text)
          st.pii.update(pii_counts)
          split = "eval" if _is_heldout(digest, c.eval_fraction, c.seed) else "train"
          writers[split][written[split] % c.shards].write(text.encode("utf-8"))
          written[split] += 1
          if split == "train" and sampled < sample_budget and not c.tokenizer.path:
            sample.append(text[:int(sample_budget - sampled) + 1])
            sampled += len(sample[-1])
        bar.update(len(results))
        bar.set_postfix(kept=st.kept, refresh=False)
      bar.close()
      for sp in splits:
        for w in writers[sp]:
          w.close()

    seconds["clean_filter_dedup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_path = os.path.join(output, "tokenizer.model")
    if c.tokenizer.path:
      fileio.atomic_copy(c.tokenizer.path, tok_path)
      tok = tokenizer_lib.Tokenizer(tok_path)
    else:
      if not sample:
        _write_stats(output, stats)
        raise ValueError(f"no document was kept from any source, so there is no text to train "
                         f"a tokenizer on; see {os.path.join(output, STATS)}")
      specials = [t for t in c.tokenizer.special_tokens.split(",") if t]
      specials += [p for p in c.pii.to_dict().values() if p and p not in specials]
      console.info(f"training a {c.tokenizer.vocab_size}-piece SentencePiece "
                   f"{c.tokenizer.model_type} tokenizer on {sum(map(len, sample)):,} characters")
      tok = tokenizer_lib.train(sample, tok_path, c.tokenizer.vocab_size,
                                model_type=c.tokenizer.model_type, special_tokens=tuple(specials))
    del sample
    seconds["tokenizer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    jobs, owners = [], []
    for name, paths in text_shards.items():
      for sp, shard_paths in paths.items():
        for p in shard_paths:
          jobs.append((p, _token_shard(p), tok_path, dtype))
          owners.append((name, sp))
    token_docs = collections.defaultdict(int)
    token_counts = collections.defaultdict(int)
    for (name, sp), (docs, tokens) in zip(owners, _ordered_map(pool, _tokenize_shard, jobs, 4 * workers)):
      token_docs[name, sp] += docs
      token_counts[name, sp] += tokens
      stats[name].tokens += tokens
    seconds["tokenize"] = time.perf_counter() - t0

  if not c.keep_text:
    for job in jobs:
      os.remove(job[0])
  manifest = {"version": 1, "tokenizer": "tokenizer.model", "vocab_size": tok.vocab_size,
              "dtype": dtype, "sources": {}}
  for name, paths in text_shards.items():
    manifest["sources"][name] = {
        "weight": c.sources[name].weight,
        "splits": {sp: {"shards": [os.path.basename(_token_shard(p)) for p in ps],
                        "documents": token_docs[name, sp], "tokens": token_counts[name, sp]}
                   for sp, ps in paths.items()}}
  out = _write_stats(output, stats, seconds)
  fileio.atomic_write_json(os.path.join(output, MANIFEST), manifest)  # last: the corpus is whole
  os.remove(os.path.join(output, PENDING))
  return out


def _write_stats(output: str, stats: dict, seconds: dict | None = None) -> dict:
  out = {name: st.as_dict() for name, st in stats.items()}
  total = _Stats()
  for st in stats.values():
    for k in ("read", "kept", "chars", "tokens", "repaired"):
      setattr(total, k, getattr(total, k) + getattr(st, k))
    total.removed.update(st.removed)
    total.pii.update(st.pii)
    for reason, where in st.first.items():
      total.first.setdefault(reason, where)
  out["total"] = total.as_dict()
  if seconds:
    out["total"]["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
  fileio.atomic_write_json(os.path.join(output, STATS), out)
  return out


def summary(stats: dict) -> str:
  """A short table of what was read, kept and removed, per source."""
  lines = [f"{'source':<16}{'read':>10}{'kept':>10}{'chars':>14}{'tokens':>14}  removed"]
  for name, s in stats.items():
    removed = ", ".join(f"{r} {n}" for r, n in sorted(s["removed"].items(), key=lambda x: -x[1]))
    lines.append(f"{name:<16}{s['read']:>10,}{s['kept']:>10,}{s['chars']:>14,}{s['tokens']:>14,}"
                 f"  {removed or '-'}")
  total = stats["total"]
  if total["pii"]:
    lines.append("PII replaced: " + ", ".join(f"{k} {n}" for k, n in total["pii"].items()))
  if total["repaired"]:
    lines.append(f"documents with invalid UTF-8 repaired: {total['repaired']}")
  for reason in RECORD_ERRORS + ("empty",):
    if reason in total["first_at"]:
      lines.append(f"first {reason}: {total['first_at'][reason]}")
  return "\n".join(lines)


def show(directory: str, n: int | None = None, out=sys.stdout):
  """Print the first `n` kept training documents (all when None), decoded."""
  corpus = read_manifest(directory)
  tok = tokenizer_lib.Tokenizer(os.path.join(directory, corpus["tokenizer"]))
  shown = 0
  for name, source in corpus["sources"].items():
    for sp, split in source["splits"].items():
      readers = []
      try:
        for shard in split["shards"]:
          readers.append(ar.ArrayRecordReader(os.path.join(directory, name, shard)))
        for j in range(split["documents"]):  # document j was written to shard j % k
          if n is not None and shown >= n:
            return shown
          k = len(readers)
          ids = np.frombuffer(readers[j % k].read([j // k])[0], corpus["dtype"])
          print(f"=== {name} {sp} #{j} ({ids.size} tokens)", file=out)
          print(tok.decode(ids), file=out)
          shown += 1
      except RuntimeError as e:  # array_record's errors: a shard missing, cut short
        raise ConfigError(f"{directory}: source {name}, split {sp}: shards don't match "
                          f"{MANIFEST} ({str(e).strip().splitlines()[0]}); prepare the corpus "
                          f"again") from None
      finally:
        for r in readers:
          with contextlib.suppress(RuntimeError):  # one that failed to open fails to close
            r.close()
  return shown


def read_manifest(directory: str) -> dict:
  """A prepared corpus's manifest, checked: a one-line ConfigError naming the file if it
  is cut short, not JSON or not shaped as `prepare` writes it (names that would lead out
  of the directory among them)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ConfigError(f"{directory}: not a prepared corpus (no {MANIFEST}); make one with "
                      f"tools/prepare_data.py")
  try:
    manifest = fileio.read_json(path)
  except ValueError as e:
    raise ConfigError(f"{e}; prepare the corpus again") from None
  problem = _manifest_problem(manifest)
  if problem:
    raise ConfigError(f"{path}: not a prepared corpus's manifest ({problem}); prepare the "
                      f"corpus again")
  return manifest


def _manifest_problem(m) -> str | None:
  """What makes `m` not a manifest `prepare` wrote, or None."""
  def count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
  if not isinstance(m, dict):
    return "not a JSON object"
  if m.get("version") != 1:
    return f"version {m.get('version')!r}; this jaxlm reads version 1"
  if not (isinstance(m.get("tokenizer"), str) and count(m.get("vocab_size"))
          and m.get("dtype") in ("uint16", "uint32") and isinstance(m.get("sources"), dict)
          and m["sources"]):
    return "tokenizer, vocab_size, dtype or sources missing or malformed"
  try:
    fileio.check_name(m["tokenizer"], "tokenizer")
    for name, source in m["sources"].items():
      fileio.check_name(name, "source")
      if not (isinstance(source, dict) and isinstance(source.get("weight"), (int, float))
              and isinstance(source.get("splits"), dict) and source["splits"]):
        return f"source {name!r}: weight or splits missing or malformed"
      for sp, split in source["splits"].items():
        if sp not in ("train", "eval") or not isinstance(split, dict):
          return f"source {name!r}: split {sp!r} malformed"
        shards = split.get("shards")
        if not (isinstance(shards, list) and shards and count(split.get("documents"))
                and count(split.get("tokens"))):
          return f"source {name!r}, split {sp}: shards, documents or tokens missing or malformed"
        for shard in shards:
          fileio.check_name(shard, f"source {name!r} shard")
  except ValueError as e:
    return str(e)
  return None


def is_prepared(spec: str) -> bool:
  """Whether `spec` is a prepared corpus's directory. False for an empty spec, and for one
  that is no readable path (os.path.isfile is False on a NUL byte, a name too long)."""
  return bool(spec.strip()) and os.path.isfile(os.path.join(spec.strip(), MANIFEST))
