"""Random-access document sources: text and JSONL files, or a prepared TFDS dataset.

Files are indexed once (byte offsets), then documents are read on demand, so a grain
pipeline can shuffle and resume by index. Every record that cannot be used is counted
per reason and reported with its file and line: `on_error="raise"` stops at the first,
"skip" counts them. A `data.train`/`data.eval` value of `tfds:NAME[:VERSION]:SPLIT` reads
a TFDS dataset already prepared on disk instead.

The checks every reader shares (JSON that can't be parsed, text that isn't UTF-8, a gzip
file that breaks off) live here too.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import re
import zlib

from jaxlm.config import ConfigError, error_detail, expand_globs

log = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")

# What reading a file can raise part way: a truncated or corrupt gzip file (EOFError,
# zlib.error, gzip.BadGzipFile, an OSError), an unreadable file. The rest of it is lost.
READ_ERRORS = (OSError, EOFError, zlib.error)


class DataError(ValueError):
  """A bad record, phrased as one line starting with its file and line."""


@dataclasses.dataclass
class Examples:
  """What a reader kept, and its counts: records, used, skipped_<reason>, truncated,
  dropped_too_long, dropped_truncated_away (records = used + skipped + dropped), with the
  place (file:line) where each reason first occurred."""
  examples: list = dataclasses.field(default_factory=list)
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: dict = dataclasses.field(default_factory=dict)

  def skip(self, where: str, reason: str, on_error: str, detail: str = "") -> None:
    """A record that can't be used: with on_error="raise" a DataError of one line naming
    `where`, else counted as skipped_<reason>. A `dropped_*` reason (too long for
    data.truncation) isn't an error: it is counted as it is, whatever on_error says."""
    if on_error == "raise" and not reason.startswith("dropped_"):
      raise DataError(f"{where}: {reason}{f' ({detail})' if detail else ''} "
                      f"(data.on_error=raise; 'skip' counts and goes on)")
    self.counts[reason if reason.startswith("dropped_") else f"skipped_{reason}"] += 1
    self.first.setdefault(reason, where)

  @property
  def skipped(self) -> dict:
    """{reason: records skipped for it}."""
    return {k[len("skipped_"):]: n for k, n in self.counts.items() if k.startswith("skipped_")}

  def report(self, split: str) -> dict:
    """The counts as metrics: data/<split>_records, _used, _skipped_<reason>, ..."""
    return {f"data/{split}_{k}": v for k, v in sorted(self.counts.items())}


def summary(name: str, ex) -> str:
  """One line of what a reader (Examples, a DocumentSource) counted."""
  c, skipped = ex.counts, ex.skipped
  line = (f"{name}: {c['records']} records, {c['used']} used, {sum(skipped.values())} skipped, "
          f"{c['truncated']} truncated, {c['dropped_too_long'] + c['dropped_truncated_away']} "
          f"dropped as too long")
  return line + (f"; skipped {skips(ex)}" if skipped else "")


def skips(ex) -> str:
  """`reason: n (first at file:line)` for each reason a record was skipped."""
  return ", ".join(f"{r}: {n} (first at {ex.first[r]})" for r, n in ex.skipped.items())


def is_text(value) -> bool:
  """Whether every string in a parsed JSON value (keys too) is text that UTF-8 can hold.
  JSON's "\\ud800" escapes decode to lone surrogates, which it can't: tokenizers and
  writers fail on them later, far from the record. Walked without recursion, as JSON
  nests deeper than Python's stack."""
  stack = [value]
  while stack:
    v = stack.pop()
    if isinstance(v, str):
      if not v.isascii():
        try:
          v.encode("utf-8")
        except UnicodeEncodeError:
          return False
    elif isinstance(v, dict):
      stack += [*v.keys(), *v.values()]
    elif isinstance(v, list):
      stack += v
  return True


def parse_json(raw: bytes | str, check_text: bool = True) -> tuple[object, str | None]:
  """(value, None), or (None, why it can't be used): `invalid_json` (not JSON, nested
  deeper than the parser goes, an integer too long to convert) or `decode_error` (not
  UTF-8, or, with `check_text`, a lone surrogate in any string of the record; a reader
  that uses one field can check just that field instead)."""
  try:
    value = json.loads(raw)
  except UnicodeDecodeError:
    return None, "decode_error"
  except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
    return None, "invalid_json"
  return (value, None) if not check_text or is_text(value) else (None, "decode_error")


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


class DocumentSource:
  """Random access to document strings (`len`, `[i]`), what grain's MapDataset reads.

  `tally` counts records, used and skipped_<reason> (an Examples whose documents are the
  source itself); `[i]` is None for a record found bad only when read (`on_error="skip"`),
  which grain leaves out: it is then counted skipped instead of used, once."""

  def __init__(self, on_error: str = "raise"):
    self.on_error = on_error
    self.tally = Examples(counts=collections.Counter(records=0, used=0))
    self._late = set()  # records found bad when read: counted once, however often read

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, idx: int) -> str | None:
    raise NotImplementedError

  @property
  def read(self) -> int:
    return self.tally.counts["records"]

  @property
  def counts(self) -> collections.Counter:
    """records, used, skipped_<reason>: the shape of SFT's counts (`sft.summary`)."""
    return self.tally.counts

  @property
  def first(self) -> dict:
    return self.tally.first

  @property
  def skipped(self) -> dict:
    return self.tally.skipped

  def report(self, split: str) -> dict:
    return self.tally.report(split)

  def _bad(self, where: str, reason: str, detail: str = "", late: bool = False) -> None:
    """A record that can't be used: raised, or counted. One found `late` (while training
    reads it, after it was counted used) moves from used to skipped, and is logged, the
    first of each reason."""
    if where in self._late and self.on_error != "raise":
      return  # read again (the next epoch): counted once
    self.tally.skip(where, reason, self.on_error, detail)
    if late:
      self._late.add(where)
      self.tally.counts["used"] -= 1
      if self.tally.counts[f"skipped_{reason}"] == 1:
        log.warning("%s: %s%s: skipped (data.on_error=skip); more are counted, not shown",
                    where, reason, f" ({detail})" if detail else "")

  def sample_text(self, max_chars: int):
    """Documents in index order until `max_chars` characters (for tokenizer training)."""
    total = 0
    for idx in range(len(self)):
      text = self[idx]
      if text is None:
        continue
      yield text[: max_chars - total]
      total += len(text)
      if total >= max_chars:
        return


class Documents(DocumentSource):
  """Documents of text and JSONL files."""

  def __init__(self, files: list[str], fmt: str = "auto", text_field: str = "text",
               text_split: str = "file", name: str = "data", on_error: str = "raise"):
    super().__init__(on_error)
    self.files = list(files)
    # Each entry: (file index, start byte, end byte) or an in-memory string (gzip files).
    self._index: list = []
    for i, path in enumerate(self.files):
      kind = file_format(path, fmt)
      if kind == "jsonl":
        self._index_jsonl(i, path, text_field)
      else:
        self._index_text(i, path, text_split)
    self.tally.counts["used"] = len(self._index)
    if not self._index:
      raise ConfigError(f"{name}: no usable documents in {len(self.files)} file(s)"
                        + (f"; skipped {skips(self.tally)}" if self.skipped else ""))

  def _index_text(self, i: int, path: str, text_split: str):
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except READ_ERRORS as e:
      self.tally.counts["records"] += 1
      self._bad(f"{path}:1", "read_error", error_detail(e))
      return
    for start, end, line in text_spans(raw, text_split):
      self.tally.counts["records"] += 1
      chunk = raw[start:end]
      try:
        text = chunk.decode("utf-8")
      except UnicodeDecodeError as e:  # name the bad line, not the paragraph's first
        bad_line = line + chunk.count(b"\n", 0, e.start)
        self._bad(f"{path}:{bad_line}", "decode_error")
        continue
      if not text.strip():
        self._bad(f"{path}:{line}", "empty")
        continue
      self._index.append((i, start, end))

  def _index_jsonl(self, i: int, path: str, field: str):
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
      with opener(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
          start, offset = offset, offset + len(line)
          if not line.strip():
            continue
          self.tally.counts["records"] += 1
          checked = self._check_jsonl(line, field)
          if isinstance(checked, str):
            self._bad(f"{path}:{lineno}", checked)
          elif path.endswith(".gz"):  # gzip has no random access: keep its documents in memory
            self._index.append(checked[0])
          else:
            self._index.append((i, start, offset, field))
    except READ_ERRORS as e:  # the file broke off reading the line after the last one read
      self.tally.counts["records"] += 1
      self._bad(f"{path}:{lineno + 1}", "read_error", error_detail(e))

  @staticmethod
  def _check_jsonl(line: bytes, field: str) -> tuple[str] | str:
    """(the document,) of a JSONL line, or why it can't be used."""
    record, reason = parse_json(line, check_text=False)  # the other fields are never read
    if reason:
      return reason
    if not isinstance(record, dict) or field not in record:
      return f"missing_field_{field}"
    if not isinstance(record[field], str):
      return f"wrong_type_{field}"
    if not is_text(record[field]):
      return "decode_error"
    if not record[field].strip():
      return "empty"
    return (record[field],)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, idx: int) -> str | None:
    entry = self._index[idx]
    if isinstance(entry, str):
      return entry
    path = self.files[entry[0]]
    try:
      with open(path, "rb") as f:
        f.seek(entry[1])
        raw = f.read(entry[2] - entry[1])
      checked = self._check_jsonl(raw, entry[3]) if len(entry) == 4 else (raw.decode("utf-8"),)
    except (*READ_ERRORS, UnicodeDecodeError) as e:
      checked = error_detail(e)
    if isinstance(checked, str):  # the file changed after it was indexed
      self._bad(_line_at(path, entry[1]), "changed_since_indexed", checked, late=True)
      return None  # grain leaves it out
    return checked[0]


def _line_at(path: str, offset: int) -> str:
  """`path:line` of the line starting at byte `offset` (counted only when needed)."""
  try:
    with open(path, "rb") as f:
      line = f.read(offset).count(b"\n") + 1
    return f"{path}:{line}"
  except OSError:
    return f"{path} (byte {offset})"


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
  into `data_dir` (TFDS's default, ~/tensorflow_datasets, when empty). `text_field` must
  be a Text feature. A split may hold millions of records, so each is checked when read,
  not up front: one that isn't UTF-8 text or is empty follows `on_error` then (named
  `SPEC[index]`; "skip" counts it, warns once per reason, and leaves it out).
  """

  def __init__(self, spec: str, text_field: str = "text", data_dir: str = "",
               name: str = "data", field_key: str = "data.text_field", on_error: str = "raise"):
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
    super().__init__(on_error)
    self.spec, self.text_field = spec, text_field
    self.tally.counts.update(records=len(self.source), used=len(self.source))
    if not self.read:
      raise ConfigError(f"{name}: {spec} has no records")

  def __len__(self) -> int:
    return len(self.source)

  def raw(self, idx: int) -> str | bytes:
    """The record's text as stored, unchecked."""
    return self.source[idx][self.text_field]

  def __getitem__(self, idx: int) -> str | None:
    text = self.raw(idx)
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError:
        text = None
    if text is not None and is_text(text) and text.strip():
      return text
    reason = "empty" if text is not None and is_text(text) else "decode_error"
    self._bad(f"{self.spec}[{idx}]", reason, late=True)
    return None  # grain leaves it out


def open_documents(spec: str, data_cfg, key: str) -> DocumentSource:
  """The documents named by a `data.train`/`data.eval` value: globs or a TFDS split."""
  if spec.strip().startswith(TFDS_PREFIX):
    return TfdsDocuments(spec.strip(), data_cfg.text_field, data_cfg.tfds_data_dir, name=key,
                         on_error=data_cfg.on_error)
  return Documents(expand_globs(spec, key), data_cfg.format, data_cfg.text_field,
                   data_cfg.text_split, name=key, on_error=data_cfg.on_error)
