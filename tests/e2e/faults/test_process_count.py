"""The same data on any number of processes: with the default data.shards (auto), the
global batches (every process's local batches joined in process order) are the same on
1, 2, 4 and 8 processes, and data states taken on 2 processes and dealt out the way a
checkpoint restore does give the same following batches on 1 and 4. In-process, without
jax.distributed: each process's pipeline is built with its process_index/process_count."""

import json
import os

import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm.data import lm, prepare, sft
from conftest import word_tokenizer

WORDS = "apple river stone cloud green quick seven table music light paper honey north ocean"
BATCH, SEQ = 8, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Documents of varied lengths, their tokenizer, and a two-source prepared corpus."""
  root = tmp_path_factory.mktemp("procs")
  tok = word_tokenizer(root, WORDS)
  rng = np.random.default_rng(0)
  docs = [f"doc {i} " + " ".join(rng.choice(WORDS.split(), rng.integers(2, 40)))
          for i in range(120)]
  c = prepare.default_config()
  for name, part in (("long", docs[:60]), ("short", [d[:30] for d in docs[60:]])):
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    c.sources[name] = prepare.source_config(str(path), filters="none", pii=False, weight=0.5)
  c.workers, c.shards, c.tokenizer.path = 1, 2, tok.path
  c.dedup.exact = c.dedup.near = False
  prepare.prepare(c, str(root / "prepared"), progress=False)
  return {"docs": docs, "tok": tok.path, "prepared": str(root / "prepared")}


def text_make(corpus):
  return lambda index, count, rows, prefetch: lm.lm_dataset(
      corpus["docs"], corpus["tok"], seq_len=SEQ, batch_size=rows, seed=3, shuffle=True,
      process_index=index, process_count=count, prefetch=prefetch)


def mixture_make(corpus):
  return lambda index, count, rows, prefetch: lm.mixture_dataset(
      corpus["prepared"], "train", {"long": 0.5, "short": 0.5}, seq_len=SEQ, batch_size=rows,
      seed=3, shuffle=True, repeat=True, process_index=index, process_count=count,
      prefetch=prefetch)


def sft_make(corpus):
  del corpus
  rng = np.random.default_rng(1)
  examples = []
  for i in range(90):
    n = int(rng.integers(3, SEQ))
    ids = rng.integers(5, 300, n + 1).astype(np.int32)
    examples.append({"inputs": ids[:-1], "targets": ids[1:],
                     "loss_mask": (np.arange(n) >= n // 2).astype(np.int32) * (i % 3 > 0)})
  return lambda index, count, rows, prefetch: sft.sft_dataset(
      examples, seq_len=SEQ, batch_size=rows, seed=3, shuffle=True, packing=True,
      process_index=index, process_count=count, prefetch=prefetch)


PATHS = {"text": text_make, "mixture": mixture_make, "sft": sft_make}


def iterators(make, n, prefetch=0):
  return [iter(lm.sharded(make, batch_size=BATCH // n, shards=0, process_index=p,
                          process_count=n, prefetch=prefetch)) for p in range(n)]


def global_batches(its, k):
  """k global batches: each process's local batch, joined in process order."""
  out = []
  for _ in range(k):
    local = [next(it) for it in its]
    out.append({key: np.concatenate([b[key] for b in local]) for key in local[0]})
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def consumed(its):
  return {name: sum(it.consumed_tokens()[name] for it in its) for name in ("long", "short")}


@pytest.mark.parametrize("path", PATHS)
def test_global_batches_are_the_same_on_1_2_4_and_8_processes(corpus, path):
  make = PATHS[path](corpus)
  reference = global_batches(iterators(make, 1), 5)
  assert reference[0]["tokens"].shape == (BATCH, SEQ)
  for n in (2, 4, 8):
    assert_same(global_batches(iterators(make, n), 5), reference)


@pytest.mark.parametrize("path", PATHS)
def test_states_from_2_processes_resume_on_1_and_4(corpus, path):
  make = PATHS[path](corpus)
  uninterrupted = iterators(make, 1)
  expected = global_batches(uninterrupted, 7)[3:]
  two = iterators(make, 2, prefetch=2)
  global_batches(two, 3)
  # What a checkpoint holds (through JSON, as orbax writes it) and what restore hands out.
  data = json.loads(json.dumps(checkpoint.merge_data_states([it.get_state() for it in two])))
  assert data["shard_count"] == 8 and sorted(data["shards"], key=int) == list(map(str, range(8)))
  for n in (1, 2, 4):
    its = iterators(make, n)
    for p, it in enumerate(its):
      it.set_state(checkpoint.local_data_state(data, p, n, "step 3"))
    assert_same(global_batches(its, 4), expected)
    if path == "mixture":  # the tokens handed to training, per source, summed over processes
      assert consumed(its) == consumed(uninterrupted)
  for it in two:
    it.close()


def test_a_shard_count_the_process_count_does_not_divide_is_one_line(corpus):
  its = iterators(text_make(corpus), 1)
  next(its[0])
  data = checkpoint.merge_data_states([its[0].get_state()])
  with pytest.raises(checkpoint.CheckpointError,
                     match="^step 1 holds data positions for 8 data shards; resume it on a "
                           "process count that divides 8, not 3$"):
    checkpoint.local_data_state(data, 0, 3, "step 1")


@pytest.mark.parametrize("path", PATHS)
def test_a_checkpoint_with_one_state_per_process_resumes_on_that_count_only(corpus, path):
  """States written before they were kept per shard: data.shards=0 was one shard a
  process, each process's iterator the plain shard dataset (a MixtureData's counting one)."""
  make = PATHS[path](corpus)
  def old(p):
    ds = make(p, 2, BATCH // 2, 0)
    return iter(ds)
  olds = [old(p) for p in range(2)]
  global_batches(olds, 2)
  data = json.loads(json.dumps({"processes": [it.get_state() for it in olds]}))
  expected = global_batches(olds, 3)
  its = iterators(make, 2)  # today's default split (8 shards) goes back to the old one (2)
  for p, it in enumerate(its):
    it.set_state(checkpoint.local_data_state(data, p, 2, "step 2"))
  assert_same(global_batches(its, 3), expected)
  if path == "mixture":
    assert consumed(its) == consumed(olds)
    # Later checkpoints are per shard, and resume on another count: here 1 process.
    one = iterators(make, 1)
    one[0].set_state(checkpoint.local_data_state(
        json.loads(json.dumps(checkpoint.merge_data_states([it.get_state() for it in its]))),
        0, 1, "step 5"))
    assert_same(global_batches(one, 2), global_batches(olds, 2))
    assert consumed(one) == consumed(olds)
  with pytest.raises(checkpoint.CheckpointError,
                     match="^step 2 holds the data positions of 2 process.es., not of data "
                           "shards .* resume it on 2 process.es., not 1$"):
    checkpoint.local_data_state(data, 0, 1, "step 2")


def test_an_old_multi_shard_state_resumes_on_its_process_count(corpus):
  """data.shards=4 on 2 processes, before per-shard states: {"shards": [two states]}."""
  make = text_make(corpus)
  olds = [iter(lm._ShardBatches([make(i, 4, 2, 0) for i in range(2 * p, 2 * p + 2)]))
          for p in range(2)]
  global_batches(olds, 2)
  data = {"processes": [it.get_state() for it in olds]}
  its = [iter(lm.sharded(make, batch_size=4, shards=4, process_index=p, process_count=2))
         for p in range(2)]
  for p, it in enumerate(its):
    it.set_state(checkpoint.local_data_state(data, p, 2, "step 2"))
  assert_same(global_batches(its, 3), global_batches(olds, 3))


def tiny_state():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return {"params": {"w": jnp.zeros(4)}, "opt_state": {"m": jnp.zeros(4)},
          "step": jnp.int32(3), "rng": jnp.zeros(2, jnp.uint32), "skipped": jnp.int32(0),
          "consecutive_skips": jnp.int32(0)}


def test_a_checkpoint_keeps_data_states_per_shard_and_refuses_an_old_one_elsewhere(
    corpus, tmp_path):
  its = iterators(text_make(corpus), 1)
  global_batches(its, 2)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=3, async_save=False)
  ckpt.save(3, tiny_state(), its[0].get_state())
  ckpt.wait()
  with open(tmp_path / "ckpt" / "3" / "data" / "metadata") as f:
    data = json.load(f)
  assert data["shard_count"] == 8 and list(data["shards"]) == [str(i) for i in range(8)]
  step, _, data_state = ckpt.restore_latest(tiny_state(), print)
  resumed = iterators(text_make(corpus), 1)
  resumed[0].set_state(data_state)
  assert step == 3 and data_state == data
  assert_same(global_batches(resumed, 2), global_batches(its, 2))
  ckpt.close()

  # One state per process from 2 processes (older checkpoints): not silently dealt out
  # on 1, and not taken for a damaged checkpoint either (it is kept where it is).
  with open(tmp_path / "ckpt" / "3" / "data" / "metadata", "w") as f:
    json.dump({"processes": [{"a": 1}, {"b": 2}]}, f)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=3, async_save=False)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"ckpt/3 holds the data positions of 2 process\(es\), not of data "
                           r"shards .*; resume it on 2 process\(es\), not 1$"):
    ckpt.restore_latest(tiny_state(), print)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]


def test_a_packer_state_without_a_remainder_resumes_exactly_through_json(corpus):
  """grain writes "no remainder" as the tuple (-1, -1); JSON gives back a list, which a
  packer took for a remainder: the resumed rows were wrong (seen after one row here)."""
  def make():
    return iter(lm.mixture_dataset(corpus["prepared"], "train", {"long": 1.0}, seq_len=SEQ,
                                   batch_size=1, seed=3, shuffle=True, repeat=True))
  full = global_batches([make()], 4)
  first = make()
  next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state["grain"]["parents"]["long"]["remainder_slices"]["tokens"] == [-1, -1]
  resumed = make()
  resumed.set_state(state)
  assert_same(global_batches([resumed], 3), full[1:])


def test_a_global_state_resumes_on_any_process_count():
  """RL's prompt stream: every process reads it whole and saves the same state, marked
  {"scope": "global"}; it resumes on any count. Unmarked per-process states do not."""
  state = {"data": {"next_index": 24}, "rollout": {}, "scope": "global"}
  data = json.loads(json.dumps({"processes": [state, state]}))
  for n in (1, 2, 4):
    assert checkpoint.local_data_state(data, 0, n, "step 3") == state
  local = {"processes": [{"next_index": 12}, {"next_index": 12}]}
  with pytest.raises(checkpoint.CheckpointError, match="resume it on 2 process.es., not 1$"):
    checkpoint.local_data_state(local, 0, 1, "step 3")
