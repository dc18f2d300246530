"""Random-access document sources: text and JSONL files, or a prepared TFDS dataset.

Files are indexed once (byte offsets), then documents are read on demand, so a grain
pipeline can shuffle and resume by index. Every record that cannot be used is counted
per reason and reported with its file and line. A `data.train`/`data.eval` value of
`tfds:NAME[:VERSION]:SPLIT` reads a TFDS dataset already prepared on disk instead.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import re

from jaxlm.config import ConfigError, expand_globs

log = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def file_format(path: str, fmt: str = "auto") -> str:
  if fmt != "auto":
    return fmt
  return "jsonl" if path.endswith(_JSONL_SUFFIXES) else "text"


def text_spans(raw: bytes, text_split: str) -> list[tuple[int, int, int]]:
  """(start byte, end byte, first line) of each document in a text file's bytes: the
  whole file, or with "paragraph" each run of text between blank lines."""
  if text_split == "file":
    return [(0, len(raw), 1)]
  spans, start, line, counted = [], 0, 1, 0
  for sep in [*re.finditer(rb"\n[ \t\r]*\n(?:[ \t\r]*\n)*", raw), None]:
    end = sep.start() if sep else len(raw)
    if end > start:
      line += raw.count(b"\n", counted, start)  # newlines since the last span: linear time
      counted = start
      spans.append((start, end, line))
    start = sep.end() if sep else start
  return spans


class SkipReport:
  """Counts of skipped records per reason, with the first place each reason occurred."""

  def __init__(self):
    self.counts = collections.Counter()
    self.first = {}

  def add(self, reason: str, where: str):
    self.counts[reason] += 1
    self.first.setdefault(reason, where)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    return "; ".join(f"{r}: {n} (first at {self.first[r]})" for r, n in sorted(self.counts.items()))


class DocumentSource:
  """Random access to document strings (`len`, `[i]`), what grain's MapDataset reads."""

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, idx: int) -> str:
    raise NotImplementedError

  def sample_text(self, max_chars: int):
    """Documents in index order until `max_chars` characters (for tokenizer training)."""
    total = 0
    for idx in range(len(self)):
      text = self[idx]
      yield text[: max_chars - total]
      total += len(text)
      if total >= max_chars:
        return


class Documents(DocumentSource):
  """Documents of text and JSONL files."""

  def __init__(self, files: list[str], fmt: str = "auto", text_field: str = "text",
               text_split: str = "file", name: str = "data"):
    self.files = list(files)
    self.skipped = SkipReport()
    self.read = 0
    # Each entry: (file index, start byte, end byte) or an in-memory string (gzip files).
    self._index: list = []
    for i, path in enumerate(self.files):
      kind = file_format(path, fmt)
      if kind == "jsonl":
        self._index_jsonl(i, path, text_field)
      else:
        self._index_text(i, path, text_split)
    if self.skipped.total:
      log.warning("%s: skipped %d of %d records: %s", name, self.skipped.total, self.read,
                  self.skipped.summary())
    if not self._index:
      raise ValueError(f"{name}: no usable documents in {len(self.files)} file(s)"
                       + (f"; skipped {self.skipped.summary()}" if self.skipped.total else ""))

  def _index_text(self, i: int, path: str, text_split: str):
    with open(path, "rb") as f:
      raw = f.read()
    for start, end, line in text_spans(raw, text_split):
      self.read += 1
      chunk = raw[start:end]
      try:
        text = chunk.decode("utf-8")
      except UnicodeDecodeError as e:
        bad_line = line + chunk.count(b"\n", 0, e.start)
        self.skipped.add("decode_error", f"{path}:{bad_line}")
        continue
      if not text.strip():
        self.skipped.add("empty", f"{path}:{line}")
        continue
      self._index.append((i, start, end))

  def _index_jsonl(self, i: int, path: str, field: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      offset = 0
      for lineno, line in enumerate(f, 1):
        start, offset = offset, offset + len(line)
        if not line.strip():
          continue
        self.read += 1
        where = f"{path}:{lineno}"
        try:
          record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
          self.skipped.add("invalid_json", where)
          continue
        if not isinstance(record, dict) or field not in record:
          self.skipped.add(f"missing_field_{field}", where)
          continue
        text = record[field]
        if not isinstance(text, str):
          self.skipped.add(f"wrong_type_{field}", where)
          continue
        if not text.strip():
          self.skipped.add("empty", where)
          continue
        # gzip has no random access: keep its documents in memory.
        self._index.append(text if path.endswith(".gz") else (i, start, offset, field))

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, idx: int) -> str:
    entry = self._index[idx]
    if isinstance(entry, str):
      return entry
    path = self.files[entry[0]]
    with open(path, "rb") as f:
      f.seek(entry[1])
      raw = f.read(entry[2] - entry[1])
    if len(entry) == 4:
      return json.loads(raw)[entry[3]]
    return raw.decode("utf-8")


TFDS_PREFIX = "tfds:"


def parse_tfds_spec(spec: str, key: str) -> tuple[str, str]:
  """`tfds:NAME[:VERSION]:SPLIT` -> (name with version, split); ConfigError naming `key`."""
  body = spec[len(TFDS_PREFIX):].strip()
  bracket = body.find("[")  # a slice, `train[:95%]`, may hold colons of its own
  head = body if bracket < 0 else body[:bracket]
  name, _, split = head.rpartition(":")
  split += "" if bracket < 0 else body[bracket:]
  if not name or not split or "," in spec:
    raise ConfigError(f"{key}={spec!r}: a TFDS source is one tfds:NAME[:VERSION]:SPLIT, "
                      f"e.g. tfds:wiki40b/en:train")
  return name, split


class TfdsDocuments(DocumentSource):
  """Documents of a TFDS dataset prepared on disk in ArrayRecord format, by random access.

  Nothing is downloaded: prepare the dataset first (`tfds build --file_format=array_record`)
  into `data_dir` (TFDS's default, ~/tensorflow_datasets, when empty). Records are used
  as stored; `text_field` must be a Text feature.
  """

  def __init__(self, spec: str, text_field: str = "text", data_dir: str = "",
               name: str = "data", field_key: str = "data.text_field"):
    dataset, split = parse_tfds_spec(spec, name)
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f"{name}={spec!r}: reading TFDS needs tensorflow-datasets "
                        f"(pip install tensorflow-datasets)") from None
    where = data_dir or "TFDS's default data_dir"
    try:
      self.source = tfds.data_source(dataset, split=split, data_dir=data_dir or None,
                                     download=False)
    except Exception as e:  # pylint: disable=broad-except  # TFDS raises many kinds
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(f"{name}={spec!r}: cannot open it in {where}: {reason}") from None
    features = self.source.dataset_info.features
    if text_field not in features or not isinstance(features[text_field],
                                                    tfds.features.Text):
      raise ConfigError(f"{field_key}={text_field!r}: not a Text feature of {dataset} "
                        f"(features: {', '.join(features.keys())})")
    self.spec, self.text_field = spec, text_field
    self.skipped = SkipReport()
    self.read = len(self.source)
    if not self.read:
      raise ValueError(f"{name}: {spec} has no records")

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, idx: int) -> str:
    text = self.source[idx][self.text_field]
    return text.decode("utf-8") if isinstance(text, bytes) else text


def open_documents(spec: str, data_cfg, key: str) -> DocumentSource:
  """The documents named by a `data.train`/`data.eval` value: globs or a TFDS split."""
  if spec.strip().startswith(TFDS_PREFIX):
    return TfdsDocuments(spec.strip(), data_cfg.text_field, data_cfg.tfds_data_dir, name=key)
  return Documents(expand_globs(spec, key), data_cfg.format, data_cfg.text_field,
                   data_cfg.text_split, name=key)
