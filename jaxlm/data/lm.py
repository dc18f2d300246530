"""Language-model batches: documents -> tokens -> packed rows -> batches, through grain.

Each document is wrapped in BOS ... EOS, documents are concatenated and split into
rows of seq_len + 1 tokens, and each row becomes

    tokens[T], targets[T], loss_mask[T], segment_ids[T], positions[T]

where a target counts only when it belongs to the same document as its input. The
iterator's state (`get_state`/`set_state`) is JSON and goes into every checkpoint; for
training data (`sharded`) it is kept per data shard, so a run resumes on another
process count with the same batches.
"""

from __future__ import annotations

import math
import os

import grain
import numpy as np

from jaxlm.data import prepare
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer, load as load_tokenizer
from jaxlm.errors import ConfigError


# One reader thread per source and data shard overlaps reads (and tokenizing) with
# packing. grain's default (16 threads and 500 documents ahead per source) made a
# 29-source mixture 30x slower on 2 cores (lock contention), and 8 text shards in one
# process 3x slower, after a 30 s start reading 8 x 500 documents ahead.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer_path: str):
    self.tokenizer_path = tokenizer_path
    self._tok = None

  def map(self, text: str):
    if self._tok is None:  # built lazily so the transform pickles into grain workers
      self._tok = load_tokenizer(self.tokenizer_path)
    tok = self._tok
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    return {"tokens": np.asarray(ids, np.int32)}


def row_to_example(row: dict) -> dict:
  """A packed row of T+1 tokens -> model inputs and shifted targets of length T."""
  tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
  example = {
      "tokens": tokens[:-1],
      "targets": tokens[1:],
      "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] != 0)).astype(np.int32),
      "segment_ids": seg[:-1].astype(np.int32),
      "positions": pos[:-1].astype(np.int32),
  }
  if "source_ids" in row:  # which mixture source each token came from
    example["source_ids"] = row["source_ids"][:-1].astype(np.int32)
  return example




def lm_dataset(docs: DocumentSource, tokenizer_path: str, *, seq_len: int, batch_size: int,
               seed: int, shuffle: bool, process_index: int = 0, process_count: int = 1,
               prefetch: int = 0, repeat: bool = True) -> grain.IterDataset:
  """A checkpointable stream of packed LM batches for this process.

  `batch_size` is the per-process batch. With `repeat` the stream is endless and every
  epoch is reshuffled; otherwise it ends after one pass. Process i reads documents
  i, i + n, i + 2n, ... of the shuffled order.
  """
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds[process_index::process_count]
  ds = ds.map(_Tokenize(tokenizer_path)).to_iter_dataset(READ_OPTIONS)
  return _pack_and_batch(ds, seq_len, batch_size, prefetch)


def _pack_and_batch(ds: grain.IterDataset, seq_len: int, batch_size: int, prefetch: int):
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  return _batch(ds, batch_size, prefetch)


def _batch(rows: grain.IterDataset, batch_size: int, prefetch: int):
  return _prefetched(rows.map(row_to_example).batch(batch_size, drop_remainder=True), prefetch)


def shard_count(shards: int, batch_size: int, process_count: int) -> int:
  """How many shards the data is split into (config `data.shards`; `batch_size` is
  global). 0 (auto): gcd(batch_size, lcm(8, process_count)), which is 8 whenever 8
  divides batch_size and the process count divides 8, so 1, 2, 4 or 8 processes see the
  same batches; it is always a multiple of the process count (which divides batch_size)."""
  return shards or math.gcd(batch_size, math.lcm(8, process_count))


def local_shards(count: int, process_index: int, process_count: int) -> range:
  """The shards process p of n handles: p*S/n .. (p+1)*S/n - 1 (`count` = S)."""
  per = count // process_count
  return range(process_index * per, (process_index + 1) * per)


def from_json(state):
  """A grain state read back from JSON, as grain wrote it: the packer's remainder slices
  are tuples again (a JSON list [-1, -1] is not its "no remainder" (-1, -1), and a
  packer restored from one would take a document for a remainder and emit wrong rows)."""
  if isinstance(state, dict):
    return {k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices"
                else from_json(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [from_json(v) for v in state]
  return state


class _ShardBatches(grain.IterDataset):
  """One batch from each of several datasets of batches, joined along the batch axis."""

  def __init__(self, parents: list[grain.IterDataset]):
    super().__init__(parents)

  def __iter__(self):
    return _ShardBatchesIterator([iter(p) for p in self._parents])


class _ShardBatchesIterator(grain.DatasetIterator):

  def __init__(self, its):
    super().__init__(its)
    self._its = its

  def __next__(self):
    parts = [next(it) for it in self._its]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self._its]}

  def set_state(self, state):
    for it, s in zip(self._its, state["shards"]):
      it.set_state(s)


def sharded(make, *, batch_size: int, shards: int, process_index: int, process_count: int,
            prefetch: int = 0) -> ShardedData:
  """This process's batches (`batch_size` rows) from data shards: shard s of S reads
  documents s, s + S, ... and packs them into rows on its own, and a batch is an equal
  number of rows from each shard, in shard order (S from `shard_count`; process p
  handles `local_shards`). The global batches are the same on any process count that
  divides S. `make(index, count, rows, prefetch)` builds the batches of shard `index` of
  `count`: a grain IterDataset, or a MixtureData."""
  count = shard_count(shards, batch_size * process_count, process_count)
  return ShardedData(make, batch_size=batch_size, count=count, process_index=process_index,
                     process_count=process_count, prefetch=prefetch)


class ShardedData:
  """The batches `sharded` describes. Iterating gives a checkpointable iterator whose
  state is kept per shard, {"shard_count": S, "shards": {"<s>": state of shard s}}, so a
  checkpoint's states can be dealt out to any process count that divides S
  (checkpoint.local_data_state); from a MixtureData, each shard's state also counts the
  tokens per source it handed to training."""

  def __init__(self, make, *, batch_size: int, count: int, process_index: int,
               process_count: int, prefetch: int):
    self._make, self.batch_size, self.prefetch = make, batch_size, prefetch
    self.process_index, self.process_count = process_index, process_count
    self.count = count
    self.local, self.datasets, self.names = self.build(count)

  def build(self, count: int):
    """(local shards, their datasets of batches, mixture source names or None)."""
    local = local_shards(count, self.process_index, self.process_count)
    parts = [self._make(i, count, self.batch_size // len(local), 0) for i in local]
    if isinstance(parts[0], MixtureData):
      return local, [p.dataset for p in parts], parts[0].names
    return local, parts, None

  def __iter__(self):
    return (_CountingShardsIterator if self.names else _ShardsIterator)(self)


class _ShardsIterator:

  def __init__(self, data: ShardedData):
    self._data = data
    self._start(data.count, data.local, data.datasets)

  def _start(self, count, local, datasets):
    self.count, self.local = count, local
    self._it = iter(_prefetched(_ShardBatches(datasets), self._data.prefetch))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def _shard_state(self, k: int, grain_state) -> dict:
    del k
    return grain_state

  def get_state(self) -> dict:
    states = self._it.get_state()["shards"]
    return {"shard_count": self.count,
            "shards": {str(i): self._shard_state(k, s)
                       for k, (i, s) in enumerate(zip(self.local, states))}}

  def set_state(self, state: dict):
    """A state from `get_state` (of this process's shards, or more), or one written
    before states were kept per shard (one per process, for this process)."""
    if "shard_count" not in state:
      state = self._per_shard(state)
    if state["shard_count"] != self.count:  # the checkpoint's split goes on as it was
      self._restart(state["shard_count"])
    missing = [i for i in self.local if str(i) not in state["shards"]]
    if missing:
      raise ValueError(f"data state without shard {missing[0]} of {self.count}")
    shards = [state["shards"][str(i)] for i in self.local]
    self._it.set_state(from_json({"shards": [self._grain_state(s) for s in shards]}))
    self._set_counts(shards)

  def _grain_state(self, shard_state):
    return shard_state

  def _set_counts(self, shard_states):
    pass

  def _restart(self, count: int):
    d = self._data
    if count % d.process_count or d.batch_size * d.process_count % count:
      raise ConfigError(f"data.batch_size={d.batch_size * d.process_count}: the checkpoint's "
                        f"data positions are for {count} shards, which must divide it and be "
                        f"a multiple of the {d.process_count} process(es)")
    self.close()
    self._start(count, *d.build(count)[:2])

  def _per_shard(self, process_state) -> dict:
    """One process's state from before states were kept per shard -> the per-shard form."""
    d = self._data
    inner = self._grain_state(process_state)
    parts = inner["shards"] if isinstance(inner, dict) and isinstance(
        inner.get("shards"), list) else [inner]  # several shards a process, or one
    count = len(parts) * d.process_count
    local = local_shards(count, d.process_index, d.process_count)
    return {"shard_count": count, "shards": {str(i): self._legacy_shard(k, process_state, g)
                                             for k, (i, g) in enumerate(zip(local, parts))}}

  def _legacy_shard(self, k, process_state, grain_state):
    del k, process_state
    return grain_state

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()


class _CountingShardsIterator(_ShardsIterator):
  """Mixture batches, counting per shard the tokens of each source handed to training."""

  def _start(self, count, local, datasets):
    super()._start(count, local, datasets)
    self.names = self._data.names
    self.tokens = np.zeros((len(local), len(self.names)), np.int64)

  def __next__(self) -> dict:
    batch = next(self._it)
    source_ids = batch.pop("source_ids")
    shards, sources = self.tokens.shape  # rows come shard by shard, an equal number each
    shard_of_row = np.repeat(np.arange(shards), len(source_ids) // shards)[:, None]
    which = (shard_of_row * sources + source_ids)[batch["segment_ids"] > 0]
    self.tokens += np.bincount(which, minlength=shards * sources).reshape(shards, sources)
    return batch

  def consumed_tokens(self) -> dict[str, int]:
    """Tokens per source this process has handed to training (its shards' counts)."""
    return dict(zip(self.names, self.tokens.sum(0).tolist()))

  def _shard_state(self, k, grain_state):
    return {"grain": grain_state, "tokens": dict(zip(self.names, self.tokens[k].tolist()))}

  def _grain_state(self, shard_state):
    return shard_state["grain"]

  def _set_counts(self, shard_states):
    self.tokens = np.array([[s["tokens"].get(n, 0) for n in self.names]
                            for s in shard_states], np.int64)

  def _legacy_shard(self, k, process_state, grain_state):
    # The process's counts go to its first shard: their sum over shards stays right.
    return {"grain": grain_state, "tokens": process_state["tokens"] if k == 0 else {}}


def _prefetched(ds, prefetch: int):
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds




class _RecordTokens(grain.transforms.Map):
  """A prepared corpus record (token ids as bytes) -> BOS ids EOS, tagged with its source."""

  def __init__(self, dtype: str, bos: int, eos: int, source: int):
    self.dtype, self.bos, self.eos, self.source = dtype, bos, eos, source

  def map(self, record: bytes):
    ids = np.frombuffer(record, self.dtype).astype(np.int32)
    tokens = np.concatenate([[self.bos], ids, [self.eos]]).astype(np.int32)
    return {"tokens": tokens, "source_ids": np.full(tokens.shape, self.source, np.int32)}


class MixtureData:
  """Batches from a prepared corpus whose sources are mixed by weight (see `mixture_dataset`).

  Iterating gives a checkpointable iterator that also counts, per source, the tokens
  this process has handed to training; the count is part of its state.
  """

  def __init__(self, dataset: grain.IterDataset, names: list[str]):
    self.dataset, self.names = dataset, names

  def __iter__(self):
    return _CountingIterator(iter(self.dataset), self.names)


class _CountingIterator:

  def __init__(self, it, names):
    self._it, self.names = it, names
    self.tokens = np.zeros(len(names), np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    source_ids = batch.pop("source_ids")
    self.tokens += np.bincount(source_ids[batch["segment_ids"] > 0], minlength=len(self.names))
    return batch

  def consumed_tokens(self) -> dict[str, int]:
    return dict(zip(self.names, self.tokens.tolist()))

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "tokens": self.consumed_tokens()}

  def set_state(self, state: dict):
    self._it.set_state(from_json(state["grain"]))
    self.tokens = np.array([state["tokens"].get(n, 0) for n in self.names], np.int64)

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()


def mixture_weights(corpus: dict, spec: str, split: str, key: str) -> dict[str, float]:
  """Source weights for one split of a prepared corpus (its manifest dict).

  `spec` is `data.mixture`: "name=weight,..." (sources left out are not read), or empty
  for the weights recorded when the corpus was prepared. Sources without documents in
  `split`, or with weight 0, are left out.
  """
  sources = corpus["sources"]
  if spec.strip():
    weights = parse_mixture(spec)
    unknown = [n for n in weights if n not in sources]
    if unknown:
      raise ConfigError(f"data.mixture: no source {unknown[0]!r} in {key}; it has "
                        f"{', '.join(sources)}")
  else:
    weights = {n: float(s["weight"]) for n, s in sources.items()}
  weights = {n: w for n, w in weights.items()
             if w > 0 and sources[n]["splits"].get(split, {}).get("documents", 0) > 0}
  if not weights:
    raise ConfigError(f"{key}: no source with documents in its {split} split has a weight > 0")
  return weights


def parse_mixture(spec: str) -> dict[str, float]:
  """"web=0.6,code=0.25" -> {"web": 0.6, "code": 0.25}; ConfigError naming data.mixture."""
  weights = {}
  for item in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = item.partition("=")
    try:
      weights[name.strip()] = float(value)
      ok = bool(sep and name.strip()) and weights[name.strip()] >= 0
    except ValueError:
      ok = False
    if not ok:
      raise ConfigError(f"data.mixture={spec!r}: expected name=weight,... with weights >= 0, "
                        f"not {item!r}")
  return weights


def mixture_dataset(directory: str, split: str, weights: dict[str, float], *, seq_len: int,
                    batch_size: int, seed: int, shuffle: bool, repeat: bool,
                    process_index: int = 0, process_count: int = 1,
                    prefetch: int = 0) -> MixtureData:
  """Packed batches from the sources of a prepared corpus (tools/prepare_data.py).

  Each source is a random-access grain dataset over its ArrayRecord shards, shuffled
  with its own seed (reshuffled each epoch when repeating); process i reads its
  documents i, i + n, ... so processes never overlap. Each source is packed into rows
  on its own, and grain mixes the rows deterministically in the weight proportions, so
  the weights are shares of tokens. Without `repeat` the stream ends when the first
  source runs out.
  """
  corpus = prepare.read_manifest(directory)
  tok = Tokenizer(os.path.join(directory, corpus["tokenizer"]))
  total = sum(weights.values())
  parts = {}
  for i, (name, weight) in enumerate(weights.items()):
    shards = corpus["sources"][name]["splits"][split]["shards"]
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(
        [os.path.join(directory, name, f) for f in shards]))
    if shuffle:
      ds = ds.shuffle(seed=seed + i)
    if repeat:
      ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(_RecordTokens(corpus["dtype"], tok.bos_id, tok.eos_id, i))
    ds = ds.to_iter_dataset(READ_OPTIONS)
    parts[name] = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": seq_len + 1, "source_ids": seq_len + 1})
  rows = grain.IterDataset.mix(parts, {n: w / total for n, w in weights.items()})
  return MixtureData(_batch(rows, batch_size, prefetch), list(weights))
