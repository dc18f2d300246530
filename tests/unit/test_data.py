import gzip
import json
import os

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.data import lm, tokenizer
from jaxlm.data.sources import Documents
from jaxlm.errors import DataError


def test_row_to_example_masks_targets_across_documents():
  row = {"tokens": np.array([2, 5, 6, 3, 2, 7, 3, 2, 9]),
         "tokens_segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 3, 3]),
         "tokens_positions": np.array([0, 1, 2, 3, 0, 1, 2, 0, 1])}
  ex = lm.row_to_example(row)
  np.testing.assert_array_equal(ex["tokens"], [2, 5, 6, 3, 2, 7, 3, 2])
  np.testing.assert_array_equal(ex["targets"], [5, 6, 3, 2, 7, 3, 2, 9])
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 0, 1, 1, 0, 1])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 3, 0, 1, 2, 0])


def test_bad_jsonl_records_are_counted_with_file_and_line(tmp_path):
  path = tmp_path / "c.jsonl.gz"
  lines = ['{"text": "good one"}', "{not json", '{"body": "x"}', '{"text": 5}', '{"text": "  "}',
           "", '{"text": "good two"}']
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=f"{path}:2: invalid_json \\(data.on_error=raise"):
    Documents([str(path)], name="data.train")
  docs = Documents([str(path)], name="data.train", on_error="skip")
  assert [docs[i] for i in range(len(docs))] == ["good one", "good two"]
  assert docs.read == 6 and docs.read == len(docs) + sum(docs.skipped.values())
  assert docs.skipped == {"invalid_json": 1, "missing_field_text": 1,
                          "wrong_type_text": 1, "empty": 1}
  assert docs.first["invalid_json"] == f"{path}:2"
  assert docs.report("train") == {"data/train_records": 6, "data/train_used": 2,
                                  "data/train_skipped_invalid_json": 1,
                                  "data/train_skipped_missing_field_text": 1,
                                  "data/train_skipped_wrong_type_text": 1,
                                  "data/train_skipped_empty": 1}


def test_text_paragraphs_and_undecodable_files(tmp_path):
  good = tmp_path / "a.txt"
  good.write_text("first para\nline two\n\n\nsecond para\n  \nthird\n")
  bad = tmp_path / "b.txt"
  bad.write_bytes(b"ok\n\xff\xfe broken\n")
  docs = Documents([str(good), str(bad)], text_split="paragraph", on_error="skip")
  assert [docs[i] for i in range(len(docs))] == ["first para\nline two", "second para", "third\n"]
  assert docs.skipped == {"decode_error": 1}
  assert docs.first["decode_error"] == f"{bad}:2"


def test_no_usable_documents_is_an_error(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text('{"x": 1}\n')
  with pytest.raises(ConfigError, match="data.eval: no usable documents"):
    Documents([str(path)], name="data.eval", on_error="skip")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "pi", "rho", "sigma", "tau"]
  with open(root / "docs.jsonl", "w") as f:
    for i in range(40):
      text = " ".join(rng.choice(words, size=rng.integers(5, 60)))
      f.write(json.dumps({"text": f"doc {i}: {text}"}) + "\n")
  docs = Documents([str(root / "docs.jsonl")])
  tok = tokenizer.train((docs[i] for i in range(len(docs))), str(root / "tok.model"), 300)
  return docs, tok


def _take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it.get_state()


def test_iterator_state_resumes_the_exact_stream(corpus):
  docs, tok = corpus
  ds = lm.lm_dataset(docs, tok.path, seq_len=16, batch_size=4, seed=3, shuffle=True, prefetch=2)
  full, _ = _take(ds, 12)
  _, state = _take(ds, 5)
  rest, _ = _take(ds, 7, json.loads(json.dumps(state)))  # through JSON, as checkpoints store it
  for a, b in zip(full[5:], rest):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_processes_read_disjoint_shares(corpus):
  docs, tok = corpus
  seen = []
  for pid in range(2):
    ds = lm.lm_dataset(docs, tok.path, seq_len=512, batch_size=1, seed=0, shuffle=False,
                       process_index=pid, process_count=2)
    batches, _ = _take(ds, 3)
    text = "".join(tok.decode(b["tokens"][0]) for b in batches)
    seen.append({int(t.split(":")[0]) for t in text.split("doc ")[1:] if t.split(":")[0].isdigit()})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert all(i % 2 == 0 for i in seen[0]) and all(i % 2 == 1 for i in seen[1])


def test_two_processes_writing_the_same_builtin_data_do_not_collide(tmp_path, monkeypatch):
  """Every process of a multi-process run writes the built-in files it reads. Here a
  second writer finishes the same file while the first is about to rename its copy into
  place: both succeed, with the same contents (a shared temporary name failed here, one
  process's rename finding the other's file gone)."""
  from jaxlm import fileio
  from jaxlm.data import sft
  part = sft.resolve_builtin("builtin:stdlib_docstrings:train", str(tmp_path / "a"), "k")[0]
  os.remove(part)  # the whole file stays; the split is written again
  real_replace, nested = os.replace, []

  def replace(src, dst):
    if dst == part and not nested:  # the other process, between our write and rename
      nested.append(None)
      nested[0] = sft.resolve_builtin("builtin:stdlib_docstrings:train",
                                      str(tmp_path / "a"), "k")[0]
    return real_replace(src, dst)

  monkeypatch.setattr(fileio.os, "replace", replace)
  ours = sft.resolve_builtin("builtin:stdlib_docstrings:train", str(tmp_path / "a"), "k")[0]
  assert nested == [ours] == [part]
  with open(part, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines and all(json.loads(line)["output"] for line in lines)
  assert not [n for n in os.listdir(tmp_path / "a" / "builtin") if n.endswith(".tmp")]
