"""Fuzzed data files for every task's reader: each record is used, or reported with its
file and line and counted (data.on_error="skip"), or stops the load with a one-line
error naming them ("raise"). Nothing is dropped silently, nothing escapes as a traceback.

Files mix valid records with malformed JSON, deep nesting, huge integers, invalid UTF-8,
lone surrogates, records that aren't objects, missing and wrong-typed fields, empty
strings, enormous strings, records past the length limit, and truncated gzip."""

import collections
import gzip
import json
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import small_config, word_tokenizer
from jaxlm import reward_fns, tasks
from jaxlm.errors import ConfigError
from jaxlm.data import preference, prompts, sft, sources
from jaxlm.data.sources import Documents
from jaxlm.errors import DataError

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DROPPED = ("dropped_too_long", "dropped_truncated_away")
READERS = ("pretrain", "sft", "preference", "prompts")
BAD = "@@BAD@@"  # where a malformed value goes into a record's main field


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return word_tokenizer(tmp_path_factory.mktemp("tok"),
                        "sure no the sky is blue green name a colour hello there answer")


# ---------------------------------------------------------------------------------------
# Records: (line bytes, what the reader must make of it: None for a blank line, "valid",
# or the reason it is skipped).

TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip)
ENORMOUS = "lorem ipsum dolor " * 3700  # ~64 KB; the 1 MB case is its own test below
LONG = "the sky is blue " * 40  # past every length limit used here


def main_record(reader: str, t: str, main: str, fmt: int = 0) -> dict:
  """A record of `reader` whose main field (the text trained on) is `main`."""
  if reader == "pretrain":
    return {"text": main}
  if reader == "sft":
    return [{"instruction": t, "output": main},
            {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": main}]},
            {"prompt": t, "completion": main}][fmt]
  if reader == "preference":
    return {"prompt": t, "chosen": main, "rejected": "no " + t}
  return [{"prompt": main, "answer": "#### 42"}, {"question": main, "answer": 7},
          {"instruction": main, "input": "", "answer": "3"}][fmt]


def dumps(record: dict) -> bytes:
  return json.dumps(record).encode()  # ASCII: a cut line is invalid JSON, not bad UTF-8


@st.composite
def valid(draw, reader):
  t, fmt = draw(TEXT), draw(st.integers(0, 2))
  main = draw(st.one_of(TEXT, st.just(ENORMOUS), st.just(LONG)))
  record = main_record(reader, t, ("sure " if reader == "preference" else "") + main, fmt)
  if draw(st.booleans()):  # an extra field nested deep, still parseable, is ignored
    record["meta"] = json.loads("[" * 300 + "]" * 300)
  if reader == "preference" and draw(st.booleans()):
    record["margin"] = draw(st.floats(-1e6, 1e6))
  return dumps(record), "valid"


# In the main field: (bytes, reason per reader in READERS order).
INJECTED = {
    "deep": ([b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000],
             ("invalid_json",) * 4),
    "huge_int": ([b"1" * 4301, b"-" + b"9" * 20000], ("invalid_json",) * 4),
    "bad_utf8": ([b'"ok\xff"', b'"\xc3("', b'"\xed\xa0\x80"', b'"a\x80b"', b'"\xf4\x90\x80\x80"'],
                 ("decode_error",) * 4),
    "surrogate": ([b'"a\\ud800b"', b'"\\udfff"', b'"x\\udbff"'], ("decode_error",) * 4),
    "wrong_type": ([b"5", b"null", b"[]", b"{}", b"true"],
                   ("wrong_type_text", "wrong_type", "wrong_type", "wrong_type")),
    "empty": ([b'" "', b'"\\t\\n"', b'"\\u3000"', b'"\\u000b "'],
              ("empty", "empty_response", "empty_response", "empty_prompt")),
}
WHOLE = {  # whole lines
    "not_object": ([b'"just a string"', b"[1, 2]", b"null", b"42", b'"line\\nbreak"'],
                   ("missing_field_text", "wrong_type", "wrong_type", "wrong_type")),
}


@st.composite
def malformed(draw, reader):
  i = READERS.index(reader)
  t, fmt = draw(TEXT), draw(st.integers(0, 2))
  kind = draw(st.sampled_from(["cut", "missing", *INJECTED, *WHOLE, "specific"]))
  if kind == "cut":  # any proper prefix of a JSON object is invalid JSON
    line = dumps(main_record(reader, t, t, fmt))
    return line[:draw(st.integers(1, len(line) - 1))], "invalid_json"
  if kind == "missing":
    record = {"pretrain": {"body": t}, "sft": {"instruction": t},
              "preference": {"prompt": t, "chosen": t}, "prompts": {"other": t}}[reader]
    return dumps(record), ("missing_field_text" if reader == "pretrain" else "missing_field")
  if kind in INJECTED:
    values, reasons = INJECTED[kind]
    line = dumps(main_record(reader, t, BAD, fmt))
    return line.replace(f'"{BAD}"'.encode(), draw(st.sampled_from(values))), reasons[i]
  if kind in WHOLE:
    values, reasons = WHOLE[kind]
    return draw(st.sampled_from(values)), reasons[i]
  return draw(SPECIFIC[reader](t))


SPECIFIC = {  # bad records only one reader knows
    "pretrain": lambda t: st.just((b'{"text": "real", "text": "\\t"}', "empty")),  # last wins
    "sft": lambda t: st.just((dumps({"messages": [{"role": "user", "content": t}]}),
                              "no_assistant_turn")),
    "preference": lambda t: st.one_of(
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" + b"0" * 300]).map(
            lambda m: (dumps({"prompt": t, "chosen": "a", "rejected": "b", "margin": BAD})
                       .replace(f'"{BAD}"'.encode(), m), "wrong_value")),
        st.just((dumps({"prompt": t, "chosen": "same", "rejected": "same"}), "identical_pair"))),
    "prompts": lambda t: st.sampled_from([
        (dumps({"prompt": t}), "missing_field_answer"),
        (dumps({"prompt": t, "answer": None}), "missing_field_answer"),
        (dumps({"prompt": t, "answer": "no number"}), "wrong_value_answer")]),
}


@st.composite
def data_file(draw, reader):
  """(entries, packing, cut): lines as (bytes, expected); "plain", "gzip" or
  "truncated_gzip"; and where a truncated one is cut, as a fraction of its bytes."""
  entry = st.one_of(valid(reader), malformed(reader),
                    st.sampled_from([(b"", None), (b"  \t", None)]))
  entries = draw(st.lists(entry, min_size=1, max_size=8))
  packing = draw(st.sampled_from(["plain", "gzip", "truncated_gzip"]))
  return entries, packing, draw(st.floats(0.0, 1.0))


def write(folder: str, entries, packing: str, cut: float) -> str:
  raw = b"".join(line + b"\n" for line, _ in entries)
  if packing == "plain":
    path = os.path.join(folder, "data.jsonl")
    with open(path, "wb") as f:
      f.write(raw)
    return path
  path = os.path.join(folder, "data.jsonl.gz")
  packed = gzip.compress(raw)
  if packing == "truncated_gzip":
    packed = packed[:1 + int(cut * (len(packed) - 2))]  # at least 1 byte, never all
  with open(path, "wb") as f:
    f.write(packed)
  return path


# ---------------------------------------------------------------------------------------
# The properties


def check_counts(path: str, entries, counts, first, packing: str) -> int | None:
  """with "skip": read == used + skipped + dropped, each bad record counted under its
  reason with the first one's file:line, every valid record used (or dropped as too
  long). Returns the line where a truncated gzip broke off (None if it didn't)."""
  broke = first.get("read_error")
  assert (broke is not None) == (packing == "truncated_gzip"), (packing, first)
  stop = int(broke.rsplit(":", 1)[1]) if broke else len(entries) + 1
  assert 1 <= stop <= len(entries) + 1
  seen = [(n, want) for n, (_, want) in enumerate(entries, 1) if want and n < stop]
  bad = collections.Counter(want for _, want in seen if want != "valid")
  bad.update(["read_error"] if broke else [])
  skipped = {k[len("skipped_"):]: v for k, v in counts.items() if k.startswith("skipped_") and v}
  assert skipped == dict(bad), (skipped, bad)
  for reason in bad:
    lines = [n for n, want in seen if want == reason] or [stop]
    assert first[reason] == f"{path}:{lines[0]}", (reason, first)
  dropped = sum(counts[d] for d in DROPPED)
  assert counts["used"] + dropped == sum(want == "valid" for _, want in seen)
  assert counts["records"] == counts["used"] + sum(skipped.values()) + dropped
  assert counts["truncated"] <= counts["used"]
  for where in first.values():
    assert re.fullmatch(re.escape(path) + r":\d+", where), where
  return stop if broke else None


def check_raise(path: str, entries, stop: int | None, load):
  """with "raise": the first bad record (or the break in a gzip file) stops the load with
  a DataError of one line that starts with its file:line."""
  end = stop or len(entries) + 1
  bad = [n for n, (_, want) in enumerate(entries, 1) if want not in (None, "valid") and n < end]
  line = bad[0] if bad else stop  # a gzip break after the last line is an error too
  if line is None:
    load()
    return
  with pytest.raises(DataError) as e:
    load()
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"{path}:{line}: "), (message, line)


@FUZZ
@given(data_file("pretrain"))
def test_pretrain_jsonl(tok, drawn):
  entries, packing, cut = drawn
  with tempfile.TemporaryDirectory() as folder:
    path = write(folder, entries, packing, cut)
    load = lambda on_error: Documents([path], name="data.train", on_error=on_error)  # noqa: E731
    try:
      docs = load("skip")
    except ConfigError as e:  # nothing usable: one line naming the key
      assert str(e).startswith("data.train: no usable documents") and "\n" not in str(e)
      assert not any(want == "valid" for _, want in entries) or packing == "truncated_gzip"
      return
    stop = check_counts(path, entries, docs.counts, docs.first, packing)
    texts = [docs[i] for i in range(len(docs))]
    assert texts == [json.loads(line)["text"] for n, (line, want) in enumerate(entries, 1)
                     if want == "valid" and n < (stop or len(entries) + 1)]
    for text in texts:  # what grain's tokenize step will do with them
      tok.encode(text)
    check_raise(path, entries, stop, lambda: load("raise"))


@FUZZ
@given(st.lists(st.one_of(TEXT.map(lambda t: (t, "valid")),
                          st.sampled_from([(b"ok \xff no", "decode_error"),
                                           (b"\xe3\x80\x80\x0b", "empty")])),
                min_size=1, max_size=6),
       st.sampled_from(["file", "paragraph"]))
def test_pretrain_text(tok, paragraphs, split):
  """Text files: paragraphs (or whole files) that aren't UTF-8 or are blank are reasons."""
  raws = [p if isinstance(p, bytes) else
          (p.replace("\n", " ").replace("\r", " ").strip() or "x").encode() for p, _ in paragraphs]
  wants = [w for _, w in paragraphs]
  with tempfile.TemporaryDirectory() as folder:
    if split == "paragraph":
      files = [os.path.join(folder, "a.txt")]
      with open(files[0], "wb") as f:
        f.write(b"\n\n".join(raws) + b"\n")
      places = [f"{files[0]}:{2 * i + 1}" for i in range(len(raws))]
    else:
      files = [os.path.join(folder, f"{i}.txt") for i in range(len(raws))]
      for name, raw in zip(files, raws):
        with open(name, "wb") as f:
          f.write(raw)
      places = [f"{name}:1" for name in files]
    load = lambda on_error: Documents(files, text_split=split, name="data.train",  # noqa: E731
                                      on_error=on_error)
    try:
      docs = load("skip")
    except ConfigError as e:
      assert "valid" not in wants and "\n" not in str(e)
      return
    bad = [(place, want) for place, want in zip(places, wants) if want != "valid"]
    assert docs.counts["records"] == len(raws) and docs.counts["used"] == len(raws) - len(bad)
    assert docs.skipped == collections.Counter(want for _, want in bad)
    assert docs.first == {want: place for place, want in reversed(bad)}  # each reason's first
    texts = [docs[i].rstrip("\n") for i in range(len(docs))]
    assert texts == [r.decode() for r, want in zip(raws, wants) if want == "valid"]
    for text in texts:
      tok.encode(text)
    if bad:
      with pytest.raises(DataError) as e:
        load("raise")
      assert str(e.value).startswith(bad[0][0] + ": ") and "\n" not in str(e.value)


def sft_loader(tok, on_error, truncation="truncate"):
  return lambda path: sft.load_examples(
      [path], tok, sft.TEMPLATES["jaxlm"], fmt="auto", seq_len=64, loss_on="completion",
      truncation=truncation, on_error=on_error)


def preference_loader(tok, on_error, truncation="truncate"):
  return lambda path: preference.load_groups(
      [path], tok, sft.TEMPLATES["jaxlm"], max_ids=64, truncation=truncation, on_error=on_error)


def prompts_loader(tok, on_error, truncation="truncate"):
  check = reward_fns.Rewards("math_answer").check
  return lambda path: prompts.load_prompts(
      [path], on_error=on_error, check=check, tok=tok, template=sft.TEMPLATES["jaxlm"],
      max_len=32, truncation=truncation)


LOADERS = {"sft": sft_loader, "preference": preference_loader, "prompts": prompts_loader}


def fuzz_records(reader, tok, drawn, truncation):
  entries, packing, cut = drawn
  make = LOADERS[reader]
  with tempfile.TemporaryDirectory() as folder:
    path = write(folder, entries, packing, cut)
    out = make(tok, "skip", truncation)(path)
    stop = check_counts(path, entries, out.counts, out.first, packing)
    assert len(out.examples) == out.counts["used"]
    if reader == "prompts":  # within the limit, still starting with BOS
      assert all(len(p.ids) <= 32 and p.ids[0] == tok.bos_id for p in out.examples)
    if reader == "sft":
      assert all(len(ex["inputs"]) <= 64 and ex["loss_mask"].any() for ex in out.examples)
    check_raise(path, entries, stop, lambda: make(tok, "raise", truncation)(path))


@FUZZ
@given(data_file("sft"), st.sampled_from(["truncate", "drop"]))
def test_sft_records(tok, drawn, truncation):
  fuzz_records("sft", tok, drawn, truncation)


@FUZZ
@given(data_file("preference"), st.sampled_from(["truncate", "drop"]))
def test_preference_records(tok, drawn, truncation):
  fuzz_records("preference", tok, drawn, truncation)


@FUZZ
@given(data_file("prompts"), st.sampled_from(["truncate", "drop"]))
def test_rl_prompt_records(tok, drawn, truncation):
  fuzz_records("prompts", tok, drawn, truncation)


# ---------------------------------------------------------------------------------------
# Single cases the fuzzing leaves to chance


def test_megabyte_records_are_used_or_reported(tok, tmp_path):
  """~1 MB strings, one valid and one with a lone surrogate at its end, in every reader."""
  big = "the sky is blue " * 65_536
  for reader in READERS:
    path = str(tmp_path / f"{reader}.jsonl")
    with open(path, "wb") as f:
      f.write(dumps(main_record(reader, "hi", "sure " + big)) + b"\n")
      f.write(dumps(main_record(reader, "hi", big + "\udc00")) + b"\n")
    if reader == "pretrain":
      docs = Documents([path], on_error="skip")
      counts, first = docs.counts, docs.first
      assert len(tok.encode(docs[0])) > 65_536
    else:
      out = LOADERS[reader](tok, "skip")(path)
      counts, first = out.counts, out.first
      assert counts["truncated"] == 1
    assert counts["used"] == 1 and counts["skipped_decode_error"] == 1, (reader, counts)
    assert first["decode_error"] == f"{path}:2"


def test_corrupt_gzip_is_reported_with_its_file(tok, tmp_path):
  """A gzip file whose bytes are damaged (not cut): whatever it decodes to is counted,
  and where it breaks is a read_error."""
  noise = np.random.default_rng(0).integers(0, 1 << 62, 3000)  # hard to compress: many blocks
  raw = b"".join(dumps({"text": f"doc {n:x}", "prompt": f"doc {n:x}", "chosen": "a",
                        "rejected": "b", "answer": 1}) + b"\n" for n in noise)
  packed = bytearray(gzip.compress(raw))
  packed[len(packed) // 2:len(packed) // 2 + 8] = b"\x00\xff" * 4
  path = str(tmp_path / "broken.jsonl.gz")
  with open(path, "wb") as f:
    f.write(packed)
  docs = Documents([path], on_error="skip")
  for out in [docs] + [LOADERS[r](tok, "skip")(path) for r in LOADERS]:
    c = out.counts
    assert c["records"] == c["used"] + sum(v for k, v in c.items() if k.startswith("skipped_"))
    assert c["skipped_read_error"] == 1 and c["used"] > 100, c  # those before the damage
    assert all(re.fullmatch(re.escape(path) + r":\d+", w) for w in out.first.values())
  with pytest.raises(DataError) as e:
    Documents([path], on_error="raise")
  assert re.match(re.escape(path) + r":\d+: ", str(e.value)) and "\n" not in str(e.value)


def test_json_list_files_that_break_off_are_one_line_errors(tok, tmp_path):
  path = tmp_path / "list.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump([{"instruction": f"q{i}", "output": "a"} for i in range(500)], f, indent=1)
  path.write_bytes(path.read_bytes()[:-40])
  with pytest.raises(DataError, match=r"list.json.gz:\d+: read_error"):
    sft_loader(tok, "skip")(str(path))
  deep = tmp_path / "deep.json"
  deep.write_text('[{"instruction": "a", "output": "b"},\n' + "[" * 5000 + "]" * 5000 + "]")
  with pytest.raises(DataError, match=r"deep.json:2: invalid JSON"):
    sft_loader(tok, "skip")(str(deep))


def test_documents_changed_after_indexing_follow_on_error(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"text": "one"}\n{"text": "two"}\n')
  docs, strict = Documents([str(path)], on_error="skip"), Documents([str(path)])
  path.write_text('{"text": "one"}\n{"txt": "two"}\n')
  assert docs[0] == "one" and docs[1] is None
  assert docs.skipped == {"changed_since_indexed": 1} and docs.counts["used"] == 1
  assert docs[1] is None and docs.skipped == {"changed_since_indexed": 1}  # counted once
  assert docs.first["changed_since_indexed"] == f"{path}:2"
  with pytest.raises(DataError, match=re.escape(f"{path}:2: changed_since_indexed")):
    strict[1]  # pylint: disable=pointless-statement


class _FakeTfds:
  """What tfds.data_source gives: records by index, the text feature as bytes."""

  def __init__(self, texts):
    self.texts = texts

  def __len__(self):
    return len(self.texts)

  def __getitem__(self, i):
    return {"text": self.texts[i]}


def test_tfds_records_follow_on_error_when_read():
  docs = object.__new__(sources.TfdsDocuments)  # without TFDS: its record access only
  docs.source = _FakeTfds([b"good", b"\xff", "\ud800", b" "])
  sources.DocumentSource.__init__(docs, on_error="skip")
  docs.spec, docs.text_field = "tfds:x:train", "text"
  docs.tally.counts.update(records=4, used=4)
  assert [docs[i] for i in range(4)] == ["good", None, None, None]
  assert docs.skipped == {"decode_error": 2, "empty": 1}
  assert docs.counts["records"] == 4 and docs.counts["used"] == 1  # records = used + skipped
  assert docs.first["decode_error"] == "tfds:x:train[1]"
  docs.on_error = "raise"
  with pytest.raises(DataError, match=re.escape("tfds:x:train[3]: empty (data.on_error=raise")):
    docs[3]  # pylint: disable=pointless-statement


def test_reward_functions_name_the_fields_they_need():
  r = reward_fns.Rewards("math_answer,overlap")
  assert r.check({"answer": "#### 3"}) is None
  assert r.check({}) == "missing_field_answer"
  assert reward_fns.Rewards("overlap").check({"output": None}) == "missing_field_reference"
  assert reward_fns.overlap(["p", "q"], ["a b", "c d"], reference=["a b", None],
                         answer=[None, "c d"]) == [1.0, 1.0]


def test_rl_prompts_fit_the_model_context(tok, tmp_path):
  """RL sizes its rows to the longest prompt: one past model.max_seq_len - rl.max_new_tokens
  is cut to it or dropped, and counted; a record without the answer math_answer reads is a
  bad record, not a reward of 0."""
  from jaxlm import loop  # pylint: disable=import-outside-toplevel
  from jaxlm.tasks import rl  # pylint: disable=import-outside-toplevel
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in [
      {"prompt": "the sky is blue", "answer": 1}, {"prompt": LONG, "answer": "#### 2"},
      {"prompt": "where is the answer?"}]))
  for truncation, used in (("truncate", 2), ("drop", 1)):
    config = small_config(**{"task": "grpo", "data.train": str(path), "data.eval": "",
                             "data.tokenizer": tok.path, "model.max_seq_len": 64,
                             "rl.max_new_tokens": 16, "reward.fn": "math_answer",
                             "data.on_error": "skip", "data.truncation": truncation})
    data = rl.Rollouts(config, str(tmp_path / truncation), loop.make_sharder(config))
    assert len(data.ids) == used and data.prompt_len <= 48
    assert max(len(i) for i in data.ids) <= data.prompt_len
    assert data.report["data/train_skipped_missing_field_answer"] == 1
    assert data.report.get("data/train_truncated", 0) + data.report.get(
        "data/train_dropped_too_long", 0) == 1, data.report


# ---------------------------------------------------------------------------------------
# A pretraining run's log


def test_pretraining_run_logs_its_record_counts(tok, tmp_path, capsys):
  lines = [json.dumps({"text": f"the sky is blue {i} " * 8}) for i in range(20)]
  lines[3], lines[11] = '{"text": "cut', json.dumps({"text": "\ud800"})
  data = tmp_path / "train.jsonl"
  data.write_text("\n".join(lines) + "\n")
  common = {"data.train": str(data), "data.eval": "", "data.tokenizer": tok.path, "steps": 2,
            "eval_every": 0, "checkpoint_every": 2, "data.batch_size": 8}
  with pytest.raises(DataError) as e:
    tasks.run(small_config(**common), str(tmp_path / "strict"))
  assert str(e.value).startswith(f"{data}:4: invalid_json (data.on_error=raise")
  tasks.run(small_config(**common, **{"data.on_error": "skip"}), str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert (f"data.train: 20 records, 18 used, 2 skipped, 0 truncated, 0 dropped as too long; "
          f"skipped invalid_json: 1 (first at {data}:4), decode_error: 1 (first at {data}:12)"
          in out), out
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    report = next(r for r in map(json.loads, f) if "data/train_records" in r)
  assert (report["data/train_records"], report["data/train_used"],
          report["data/train_skipped_invalid_json"], report["data/train_skipped_decode_error"]) \
      == (20, 18, 1, 1), report
