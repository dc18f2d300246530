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
import re
import zlib

from jaxlm import console
from jaxlm.errors import ConfigError, DataError, error_detail
from jaxlm.fileio import expand_globs


_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")

# What reading a file can raise part way: a truncated or corrupt gzip file (EOFError,
# zlib.error, gzip.BadGzipFile, an OSError), an unreadable file. The rest of it is lost.
READ_ERRORS = (OSError, EOFError, zlib.error)


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


MAX_RECORD_BYTES = 1 << 24  # data.max_record_bytes' default: a record over it is too_long
_SKIP_CHUNK = 1 << 20  # the piece an over-long line is skipped in


def bounded_lines(f, max_bytes: int):
  """(start byte, end byte, line) for each line of the binary file `f`, reading at most
  max_bytes + 1 bytes at a time. A line longer than `max_bytes` (its newline aside) is
  skipped in bounded pieces and given as None: memory stays bounded by the limit, not
  by the input."""
  offset = 0
  while line := f.readline(max_bytes + 1):
    start = offset
    offset += len(line)
    if len(line) > max_bytes and not line.endswith(b"\n"):
      while rest := f.readline(min(max_bytes + 1, _SKIP_CHUNK)):
        offset += len(rest)
        if rest.endswith(b"\n"):
          break
      line = None
    yield start, offset, line


def too_long(value, max_bytes: int) -> bool:
  """Whether a record already in memory (a TFDS or Parquet value) is over `max_bytes`."""
  if isinstance(value, bytes):
    return len(value) > max_bytes
  return isinstance(value, str) and (len(value) > max_bytes or (
      4 * len(value) > max_bytes and len(value.encode("utf-8", "surrogatepass")) > max_bytes))


def _is_blank(line: bytes | None) -> bool:
  return line is not None and line.endswith(b"\n") and not line[:-1].strip(b" \t\r")


def text_documents(f, text_split: str, max_bytes: int):
  """(start byte, end byte, first line, bytes or None) of each document of a binary text
  file: the whole file, or with "paragraph" each run of text between blank lines (a blank
  line holds only spaces, tabs and CRs). A whole file over `max_bytes` (a book, a wiki
  dump) is split into documents of at most `max_bytes`, each ending at a line break (or,
  in a line longer than that, at a character boundary). None: a paragraph over
  `max_bytes`; it is skipped in bounded pieces, never held whole."""
  if text_split == "file":
    start, line, raw = 0, 1, b""
    while True:
      raw += f.read(max_bytes + 1 - len(raw))
      if len(raw) <= max_bytes:  # the rest of the file is one document
        if raw or start == 0:
          yield start, start + len(raw), line, raw
        return
      cut = raw.rfind(b"\n", 0, max_bytes) + 1
      if cut <= 0:  # one line over the limit: cut it at a UTF-8 character boundary
        cut = max_bytes
        while cut > 1 and (raw[cut] & 0xC0) == 0x80:
          cut -= 1
      piece, raw = raw[:cut], raw[cut:]
      yield start, start + cut, line, piece
      start, line = start + cut, line + piece.count(b"\n")
  start, first, parts, size, end = 0, 1, [], 0, 0  # the paragraph being read
  in_gap = False  # inside a run of blank lines, which separates paragraphs
  for lineno, (offset, line_end, line) in enumerate(bounded_lines(f, max_bytes), 1):
    if in_gap:
      if _is_blank(line):
        continue
      in_gap, start, first, parts, size = False, offset, lineno, [], 0
    if _is_blank(line) and parts:  # the paragraph ends before the newline of its last line
      if end > start:
        yield start, end, first, _joined(parts, end - start, max_bytes)
      in_gap = True
      continue
    parts.append(line)
    size += line_end - offset
    end = line_end - 1 if line is not None and line.endswith(b"\n") else line_end
    if size > max_bytes + 1 or line is None:  # too long (its last newline aside): the rest
      parts = [None]                          # of it is only counted
  if not in_gap and size > 0:
    yield start, start + size, first, _joined(parts, size, max_bytes)


def _joined(parts: list, size: int, max_bytes: int) -> bytes | None:
  """A paragraph's bytes without its last newline, or None when it is over the limit."""
  if None in parts or size > max_bytes:
    return None
  return b"".join(parts)[:size]


_STRUCTURE = re.compile(rb'["\[\]{}]')  # what matters outside strings
_IN_STRING = re.compile(rb'["\\]')      # and inside them
_SCALAR_END = re.compile(rb"[\s,\]]")
_BROKEN_LIST = ("a broken .json list stops here whatever data.on_error says, since the "
                "records after it can't be found")


def json_list(f, path: str, max_bytes: int, chunk: int = 1 << 20):
  """(line, bytes or None) for each element of the JSON list in the binary file `f`, read
  in pieces of `chunk` bytes. An element is found by its brackets and quotes (parsing it
  is the caller's); None when it is over `max_bytes`, skipped without being held whole.
  A file that isn't a list, breaks off inside an element or can't be read is a
  DataError naming the line."""
  buf, line = bytearray(), 1  # line: the line buf[0] is on

  def fill() -> bool:
    try:
      data = f.read(chunk)
    except READ_ERRORS as e:
      at = line + buf.count(b"\n")
      raise DataError(f"{path}:{at}: read_error ({error_detail(e)}); {_BROKEN_LIST}") from None
    buf.extend(data)
    return bool(data)

  def drop(n: int) -> None:  # forget buf[:n], counting its lines
    nonlocal line
    line += buf.count(b"\n", 0, n)
    del buf[:n]

  def skip(chars: bytes) -> bool:  # drop `chars` at the front; False at the end of the file
    while True:
      i = 0
      while i < len(buf) and buf[i] in chars:
        i += 1
      drop(i)
      if buf or not fill():
        return bool(buf)

  if not skip(b" \t\r\n") or buf[0] != ord("["):
    raise DataError(f"{path}:1: a .json SFT file must hold a list of records (or use .jsonl)")
  drop(1)
  while skip(b" \t\r\n,") and buf[0] != ord("]"):
    start_line, skipped, j, depth, in_string = line, 0, 0, 0, False
    scalar = buf[0] not in b'[{"'
    while True:
      end = None
      if scalar:
        m = _SCALAR_END.search(buf, j)
        end, j = (m.start(), m.start()) if m else (None, len(buf))
      while not scalar and end is None:
        m = (_IN_STRING if in_string else _STRUCTURE).search(buf, j)
        if m is None:
          j = max(j, len(buf))
          break
        c, j = buf[m.start()], m.end()
        if in_string and c == ord("\\"):
          j += 1  # the escaped character, which may be in the next piece
        elif in_string or c == ord('"'):
          in_string = not in_string
          end = j if depth == 0 and not in_string else None
        else:
          depth += 1 if c in b"[{" else -1
          end = j if depth == 0 else None
      if end is not None:
        break
      if skipped + len(buf) > max_bytes:  # too long: keep counting lines, not bytes
        n = min(j, len(buf))
        skipped, j = skipped + n, j - n
        drop(n)
      if not fill():
        if scalar:
          end = len(buf)
          break
        raise DataError(f"{path}:{start_line}: invalid JSON (the file ends inside this "
                        f"record); {_BROKEN_LIST}")
    element = None if skipped + end > max_bytes else bytes(buf[:end])
    drop(end)
    yield start_line, element


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
        console.warning(f"{where}: {reason}{f' ({detail})' if detail else ''}: skipped "
                        f"(data.on_error=skip); more are counted, not shown")

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
               text_split: str = "file", name: str = "data", on_error: str = "raise",
               max_bytes: int = MAX_RECORD_BYTES):
    super().__init__(on_error)
    self.files = list(files)
    self.max_bytes = max_bytes  # a document (a line of JSONL) over it is too_long
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
    line = 1
    try:
      with open(path, "rb") as f:
        for start, end, line, chunk in text_documents(f, text_split, self.max_bytes):
          self.tally.counts["records"] += 1
          if chunk is None:
            self._bad(f"{path}:{line}", "too_long", f"over data.max_record_bytes={self.max_bytes}")
            continue
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
    except READ_ERRORS as e:
      self.tally.counts["records"] += 1
      self._bad(f"{path}:{line}", "read_error", error_detail(e))

  def _index_jsonl(self, i: int, path: str, field: str):
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
      with opener(path, "rb") as f:
        for lineno, (start, offset, line) in enumerate(bounded_lines(f, self.max_bytes), 1):
          if line is not None and not line.strip():
            continue
          self.tally.counts["records"] += 1
          checked = "too_long" if line is None else self._check_jsonl(line, field)
          if isinstance(checked, str):
            detail = f"over data.max_record_bytes={self.max_bytes}" if line is None else ""
            self._bad(f"{path}:{lineno}", checked, detail)
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
    line = 1
    with open(path, "rb") as f:
      while offset > 0 and (piece := f.read(min(offset, _SKIP_CHUNK))):  # in bounded pieces
        line, offset = line + piece.count(b"\n"), offset - len(piece)
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
  max_bytes = MAX_RECORD_BYTES  # a record over it is too_long

  def __init__(self, spec: str, text_field: str = "text", data_dir: str = "",
               name: str = "data", field_key: str = "data.text_field", on_error: str = "raise",
               max_bytes: int = MAX_RECORD_BYTES):
    dataset, split = parse_tfds_spec(spec, name)
    try:
      import tensorflow_datasets as tfds  # lazy: only for tfds: sources
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
    self.spec, self.text_field, self.max_bytes = spec, text_field, max_bytes
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
    if too_long(text, self.max_bytes):
      self._bad(f"{self.spec}[{idx}]", "too_long", f"over data.max_record_bytes={self.max_bytes}",
                late=True)
      return None
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
                         on_error=data_cfg.on_error, max_bytes=data_cfg.max_record_bytes)
  return Documents(expand_globs(spec, key), data_cfg.format, data_cfg.text_field,
                   data_cfg.text_split, name=key, on_error=data_cfg.on_error,
                   max_bytes=data_cfg.max_record_bytes)
