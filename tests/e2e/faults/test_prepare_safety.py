"""Corpus preparation never writes into or removes what it did not write, never leaves a
manifest pointing at partial shards, names the file of a damaged manifest in one line,
takes its workers with it when killed, and reads over-long records in bounded pieces."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import small_config
from jaxlm import fileio
from jaxlm.errors import ConfigError
from jaxlm.data import prepare, sft, sources
from jaxlm.data.sources import Documents
from jaxlm.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SENTENCE = "The river runs past the stone garden and the old market in winter light."


def write_docs(path, n=6, start=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for i in range(start, start + n):
      f.write(json.dumps({"text": f"Document {i}. " + SENTENCE}) + "\n")
  return str(path)


def tiny_config(**sources_):
  c = prepare.default_config()
  for name, path in sources_.items():
    c.sources[name] = prepare.source_config(path, filters="none")
  c.workers, c.shards, c.tokenizer.vocab_size = 1, 2, 300
  c.dedup.near = False
  return c


def snapshot(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for folder, _, names in os.walk(root):
    for n in names:
      p = os.path.join(folder, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A prepared corpus to copy: (its folder, its config)."""
  root = tmp_path_factory.mktemp("corpus")
  c = tiny_config(d=write_docs(root / "in" / "docs.jsonl", 40))
  prepare.prepare(c, str(root / "out"), progress=False)
  return root, c


# ---------------------------------------------------------------------------------------
# Output and inputs apart


@pytest.mark.parametrize("case", ["same", "parent", "child", "recursive_root", "holds_file"])
def test_an_output_overlapping_an_input_is_refused_before_any_work(tmp_path, case):
  books = tmp_path / "books"
  write_docs(books / "a.jsonl")
  write_docs(books / "deep" / "b.jsonl")
  spec, output = {
      "same": (str(books), books),
      "parent": (str(books), tmp_path),
      "child": (str(books), books / "out"),
      "recursive_root": (str(books / "**" / "*.jsonl"), books / "deep" / "out"),
      "holds_file": (str(books / "*.jsonl"), books),
  }[case]
  before = snapshot(tmp_path)
  with pytest.raises(ConfigError, match=r"^--output .*(overlaps the input folder|holds the "
                                        r"input file).*sources\.books\.path") as e:
    prepare.prepare(tiny_config(books=spec), str(output), progress=False, overwrite=True)
  assert "\n" not in str(e.value)
  assert snapshot(tmp_path) == before and not os.path.exists(output / prepare.PENDING)


def test_the_tool_refuses_to_prepare_a_folder_onto_itself(tmp_path):
  """The reported case: --input books/ --output . --overwrite deleted books/."""
  write_docs(tmp_path / "books" / "a.jsonl")
  before = snapshot(tmp_path)
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/prepare_data.py"),
                           "--input", "books/", "--output", ".", "--overwrite"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "overlaps the input folder books/" in result.stderr
  assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------
# --overwrite removes only what a preparation wrote


def copy_corpus(corpus, tmp_path):
  root, c = corpus
  out = tmp_path / "out"
  for rel, data in snapshot(root / "out").items():
    os.makedirs(os.path.dirname(out / rel), exist_ok=True)
    (out / rel).write_bytes(data)
  return out, c.copy_and_resolve_references()


def test_overwrite_removes_only_the_files_the_manifest_lists(corpus, tmp_path):
  out, c = copy_corpus(corpus, tmp_path)
  (out / "mine.txt").write_text("mine")
  (out / "d" / "notes.txt").write_text("also mine")  # in the source's folder
  (out / ".stats.json.k1ll3d.tmp").write_text("{")  # a killed atomic write of stats.json
  (out / ".mine.txt.x.tmp").write_text("not of a file a preparation writes")
  c.shards = 1
  prepare.prepare(c, str(out), overwrite=True, progress=False)
  assert not os.path.exists(out / ".stats.json.k1ll3d.tmp")
  assert os.path.exists(out / ".mine.txt.x.tmp")
  assert (out / "mine.txt").read_text() == "mine"
  assert (out / "d" / "notes.txt").read_text() == "also mine"
  assert sorted(os.listdir(out / "d")) == ["notes.txt", "train-00000-of-00001.array_record"]
  assert not os.path.exists(out / prepare.PENDING)
  # A source that is gone: its shards go, and its folder, once empty.
  (out / "d" / "notes.txt").unlink()
  c.sources = {"e": prepare.source_config(c.sources.d.path, filters="none")}
  prepare.prepare(c, str(out), overwrite=True, progress=False)
  assert not os.path.exists(out / "d") and os.path.isdir(out / "e")


@pytest.mark.parametrize("where", ["source", "shard", "tokenizer"])
def test_names_in_a_manifest_that_lead_out_are_refused(corpus, tmp_path, where):
  out, c = copy_corpus(corpus, tmp_path)
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "precious.txt").write_text("keep")
  manifest = json.loads((out / prepare.MANIFEST).read_text())
  if where == "source":
    manifest["sources"]["../victim"] = manifest["sources"].pop("d")
  elif where == "shard":
    manifest["sources"]["d"]["splits"]["train"]["shards"][0] = "../../victim/precious.txt"
  else:
    manifest["tokenizer"] = "../victim/precious.txt"
  (out / prepare.MANIFEST).write_text(json.dumps(manifest))
  before = snapshot(tmp_path)
  for attempt in (lambda: prepare.prepare(c, str(out), overwrite=True, progress=False),
                  lambda: prepare.read_manifest(str(out))):
    with pytest.raises(ConfigError, match=r"prepared.json: not a prepared corpus's manifest "
                                          r"\(.*not a plain name"):
      attempt()
  assert snapshot(tmp_path) == before


def test_a_file_in_the_way_that_no_preparation_wrote_is_refused(corpus, tmp_path):
  root, c = corpus
  out = tmp_path / "out"
  (out / "d").mkdir(parents=True)
  (out / "d" / "train-00000-of-00002.array_record").write_text("user data, same name")
  with pytest.raises(ConfigError, match="exists and was not written by a preparation"):
    prepare.prepare(c, str(out), progress=False)
  (out / "d" / "train-00000-of-00002.array_record").unlink()
  (out / "d" / "other.txt").write_text("a folder of the user's, named like the source")
  with pytest.raises(ConfigError, match=r"out/d exists and was not written by a preparation"):
    prepare.prepare(c, str(out), progress=False)
  assert sorted(os.listdir(out)) == ["d"] and os.listdir(out / "d") == ["other.txt"]


def test_the_manifest_is_written_last_and_atomically(corpus, tmp_path, monkeypatch):
  """A run stopped while writing prepared.json leaves none (and no part of one); the
  next run, without --overwrite, replaces that run's files."""
  _, c = corpus
  out = tmp_path / "out"
  real_replace = os.replace

  def failing_replace(src, dst):
    if os.path.basename(dst) == prepare.MANIFEST:
      raise OSError(28, "No space left on device")
    return real_replace(src, dst)
  monkeypatch.setattr(fileio.os, "replace", failing_replace)
  with pytest.raises(OSError, match="No space left"):
    prepare.prepare(c, str(out), progress=False)
  monkeypatch.undo()
  left = sorted(os.listdir(out))
  assert prepare.MANIFEST not in left and not prepare.is_prepared(str(out)), left
  assert "stats.json" in left and prepare.PENDING in left  # written before the manifest
  assert not [f for f in left if f.endswith(".tmp")], left
  prepare.prepare(c, str(out), progress=False)
  assert prepare.is_prepared(str(out)) and not os.path.exists(out / prepare.PENDING)


# ---------------------------------------------------------------------------------------
# A damaged manifest: one line naming it


@pytest.mark.parametrize("damage", ["cut", "not_json", "shape"])
def test_a_damaged_manifest_is_one_line_naming_the_file(corpus, tmp_path, damage):
  out, c = copy_corpus(corpus, tmp_path)
  path = out / prepare.MANIFEST
  raw = path.read_text()
  path.write_text({"cut": raw[: len(raw) // 2], "not_json": "\x00garbage",
                   "shape": json.dumps({"version": 1, "sources": []})}[damage])
  from jaxlm.tasks import common
  config = small_config(**{"data.train": str(out)})
  for attempt in (lambda: prepare.read_manifest(str(out)),
                  lambda: prepare.show(str(out), 1, out=io.StringIO()),
                  lambda: prepare.prepare(c, str(out), overwrite=True, progress=False),
                  lambda: common.prepared_tokenizer(config, str(out), "data.train")):
    with pytest.raises(ConfigError) as e:
      attempt()
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_show_of_a_missing_shard_is_one_line(corpus, tmp_path):
  out, _ = copy_corpus(corpus, tmp_path)
  (out / "d" / "train-00000-of-00002.array_record").unlink()
  with pytest.raises(ConfigError, match=r"source d, split train: shards don't match "
                                        r"prepared.json \(.*No such file") as e:
    prepare.show(str(out), out=io.StringIO())
  assert "\n" not in str(e.value)


def test_show_of_a_damaged_manifest_exits_2_with_one_line(corpus, tmp_path):
  out, _ = copy_corpus(corpus, tmp_path)
  raw = (out / prepare.MANIFEST).read_text()
  (out / prepare.MANIFEST).write_text(raw[:40])
  result = subprocess.run([sys.executable, "tools/prepare_data.py", "--show", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith(f"error: {out / prepare.MANIFEST}: not readable JSON")


# ---------------------------------------------------------------------------------------
# One glob expander


def test_prepare_selects_files_with_the_one_expander(tmp_path, monkeypatch):
  for rel in ("a.jsonl", "x/b.jsonl", "x/y/c.jsonl", ".hidden/d.jsonl", "x/.e.jsonl",
              "__pycache__/f.jsonl"):
    write_docs(tmp_path / rel, 1)
  calls = []
  real = fileio.expand
  monkeypatch.setattr(fileio, "expand", lambda spec: calls.append(spec) or real(spec))
  for spec in (str(tmp_path), str(tmp_path / "**" / "*.jsonl"), str(tmp_path / "x" / "*.jsonl")):
    c = tiny_config(s=spec)
    calls.clear()
    prepare.check_config(c)
    assert calls, "prepare expands globs with fileio.expand"
    read = {w.rsplit(":", 1)[0] for w, _, _ in prepare.read_source(c.sources.s, "sources.s")}
    assert read == set(fileio.expand_globs(spec, "data.train")), spec
  assert not hasattr(prepare, "_walk") and not hasattr(prepare, "_files")


# ---------------------------------------------------------------------------------------
# Workers die with their parent


def _children(pid):
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.append(int(entry))
  return out


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except OSError:
    return False


def _cmdline(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except OSError:
    return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_the_tool_is_killed(tmp_path):
  data = write_docs(tmp_path / "in" / "docs.jsonl", 200)  # 4 chunks: both workers start
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from jaxlm.data import prepare\n\ndef get_config():\n"
                 "  c = prepare.default_config()\n"
                 f"  c.sources.d = prepare.source_config({data!r})\n"
                 "  c.workers = 2\n  return c\n")
  env = dict(os.environ, JAXLM_FAILPOINT="prepare:worker")  # workers stay busy
  tool = subprocess.Popen([sys.executable, "tools/prepare_data.py", "--config", str(cfg),
                           "--output", str(tmp_path / "out")], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  children = []
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      children = _children(tool.pid)
      if sum("spawn_main" in _cmdline(p) for p in children) >= 2:
        break
      assert tool.poll() is None, "the tool ended before its workers started"
      time.sleep(0.05)
    assert sum("spawn_main" in _cmdline(p) for p in children) >= 2, children
    tool.send_signal(signal.SIGKILL)
    tool.wait(timeout=10)
    deadline = time.monotonic() + 20
    while any(map(_alive, children)) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not [p for p in children if _alive(p)], [_cmdline(p) for p in children]
    assert not prepare.is_prepared(str(tmp_path / "out"))
  finally:
    for pid in [tool.pid] + children:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# Over-long records: counted too_long, never read whole


class RecordingFile(io.BytesIO):
  """A file that remembers the largest piece it was asked for."""
  largest = 0

  def readline(self, size=-1):
    self.largest = max(self.largest, size if size >= 0 else len(self.getbuffer()))
    return super().readline(size)

  def read(self, size=-1):
    self.largest = max(self.largest, size if size >= 0 else len(self.getbuffer()))
    return super().read(size)


BIG = 3 << 20  # a few MB, against a limit of a few KB
LIMIT = 4096


def test_bounded_readers_never_hold_an_over_long_line():
  raw = b'{"text": "short"}\n{"text": "' + b"x" * BIG + b'"}\n{"text": "after"}\n'
  f = RecordingFile(raw)
  lines = [line for _, _, line in sources.bounded_lines(f, LIMIT)]
  assert lines == [b'{"text": "short"}\n', None, b'{"text": "after"}\n']
  assert f.largest <= LIMIT + 1
  f = RecordingFile(b"a\n\n" + b"word " * (BIG // 5) + b"\n\nlast paragraph\n")
  docs = [(line, raw) for _, _, line, raw in sources.text_documents(f, "paragraph", LIMIT)]
  assert docs == [(1, b"a"), (3, None), (5, b"last paragraph\n")]
  assert f.largest <= LIMIT + 1
  # A whole file over the limit is split into documents at line breaks (or, in one line
  # longer than the limit, at a character boundary), each at most the limit.
  book = ("€" * 2000 + "\n" + "line of a book\n" * (BIG // 15)).encode()
  f = RecordingFile(book)
  docs = list(sources.text_documents(f, "file", LIMIT))
  assert b"".join(raw for *_, raw in docs) == book and f.largest <= LIMIT + 1
  assert all(0 < len(raw) <= LIMIT for *_, raw in docs) and len(docs) > BIG // LIMIT
  assert [raw.decode("utf-8")[-1] for *_, raw in docs[1:-1]] == ["\n"] * (len(docs) - 2)
  assert docs[0][:3] == (0, 4095, 1)  # 3-byte characters: cut before the one split at 4096
  assert docs[1][2] == 1 and all(docs[i + 1][2] == docs[i][2] + docs[i][3].count(b"\n")
                                 for i in range(len(docs) - 1))  # each names its first line
  assert all(docs[i][1] == docs[i + 1][0] for i in range(len(docs) - 1))
  records = [{"instruction": "q", "output": "a"}, {"instruction": "x" * BIG, "output": "a"},
             {"instruction": "r", "output": "b"}]
  f = RecordingFile(json.dumps(records, indent=1).encode())
  found = list(sources.json_list(f, "list.json", LIMIT, chunk=1024))
  assert [line for line, _ in found] == [2, 6, 10]
  assert found[1][1] is None and json.loads(found[2][1]) == records[2]
  assert f.largest <= 1024


def test_over_long_records_are_too_long_under_data_on_error(tmp_path):
  long_line = json.dumps({"text": "x" * BIG})
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text(f'{{"text": "short one"}}\n{long_line}\n{{"text": "after"}}\n')
  text = tmp_path / "book.txt"
  text.write_text("first paragraph\n\n" + "word " * (BIG // 5) + "\n\nlast one\n")
  docs = Documents([str(jsonl)], on_error="skip", max_bytes=LIMIT)
  assert docs.counts["skipped_too_long"] == 1 and docs.first["too_long"] == f"{jsonl}:2"
  assert [docs[i] for i in range(len(docs))] == ["short one", "after"]
  docs = Documents([str(text)], text_split="paragraph", on_error="skip", max_bytes=LIMIT)
  assert docs.counts["skipped_too_long"] == 1 and docs.first["too_long"] == f"{text}:3"
  assert len(docs) == 2
  with pytest.raises(DataError, match=rf"^{jsonl}:2: too_long \(over data.max_record_bytes=4096"):
    Documents([str(jsonl)], on_error="raise", max_bytes=LIMIT)
  # The training key reaches the reader.
  config = small_config(**{"data.train": str(jsonl), "data.max_record_bytes": LIMIT,
                           "data.on_error": "skip"})
  docs = sources.open_documents(str(jsonl), config.data, "data.train")
  assert docs.counts["skipped_too_long"] == 1
  # SFT, preference and RL prompt records (sft.read_records), JSONL and .json lists.
  sft_jsonl = tmp_path / "sft.jsonl"
  sft_jsonl.write_text('{"prompt": "a", "completion": "b"}\n'
                       + json.dumps({"prompt": "x" * BIG, "completion": "b"}) + "\n")
  assert [r for _, r in sft.read_records(str(sft_jsonl), max_bytes=LIMIT)][1] == "too_long"
  sft_json = tmp_path / "sft.json"
  sft_json.write_text(json.dumps([{"prompt": "a", "completion": "b"},
                                  {"prompt": "x" * BIG, "completion": "b"}], indent=1))
  got = list(sft.read_records(str(sft_json), max_bytes=LIMIT))
  assert got[0][1] == {"prompt": "a", "completion": "b"} and got[1] == (f"{sft_json}:6",
                                                                        "too_long")


def test_prepare_removes_over_long_records_as_too_long(tmp_path):
  src = tmp_path / "docs.jsonl"
  write_docs(src, 5)
  with open(src, "a") as f:
    f.write(json.dumps({"text": SENTENCE * (BIG // len(SENTENCE))}) + "\n")
  c = tiny_config(d=str(src))
  c.max_record_bytes = LIMIT
  stats = prepare.prepare(c, str(tmp_path / "out"), progress=False)["d"]
  assert stats["removed"] == {"too_long": 1} and stats["kept"] == 5
  assert stats["first_at"]["too_long"] == f"{src}:6"
  c.on_error = "fail"
  with pytest.raises(ValueError, match=rf"{src}:6: too_long \(sources.d; on_error=fail\)"):
    prepare.prepare(c, str(tmp_path / "out2"), progress=False)
  c.max_record_bytes = 0
  with pytest.raises(ConfigError, match="max_record_bytes=0: must be >= 1"):
    prepare.check_config(c)
