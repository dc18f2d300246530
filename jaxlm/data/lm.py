"""Language-model batches: documents -> tokens -> packed rows -> batches, through grain.

Each document is wrapped in BOS ... EOS, documents are concatenated and split into
rows of seq_len + 1 tokens, and each row becomes

    tokens[T], targets[T], loss_mask[T], segment_ids[T], positions[T]

where a target counts only when it belongs to the same document as its input. The
iterator's state (`get_state`/`set_state`) is JSON and goes into every checkpoint.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer, load as load_tokenizer


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
  ds = ds.map(_Tokenize(tokenizer_path)).to_iter_dataset()
  return _pack_and_batch(ds, seq_len, batch_size, prefetch)


def _pack_and_batch(ds: grain.IterDataset, seq_len: int, batch_size: int, prefetch: int):
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  return _batch(ds, batch_size, prefetch)


def _batch(rows: grain.IterDataset, batch_size: int, prefetch: int):
  return _prefetched(rows.map(row_to_example).batch(batch_size, drop_remainder=True), prefetch)


def data_shards(shards: int, process_index: int, process_count: int) -> tuple[range, int]:
  """This process's data shards and their count. `shards` (config `data.shards`) fixes how
  the data is split, whatever the process count: shard s reads documents s, s + S, ...
  and packs them into rows on its own; a batch is rows from every shard in order, an equal
  number each. Process p of n handles shards p*S/n .. (p+1)*S/n - 1, so the global
  batches, and a run's losses, are the same on 1 process or n. 0: one shard a process."""
  count = shards or process_count
  per = count // process_count
  return range(process_index * per, (process_index + 1) * per), count


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
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self._its]}

  def set_state(self, state):
    for it, s in zip(self._its, state["shards"]):
      it.set_state(s)


def sharded(make, *, batch_size: int, shards: int, process_index: int, process_count: int,
            prefetch: int = 0):
  """This process's batches (`batch_size` rows) from data shards (see `data_shards`).
  `make(index, count, rows, prefetch)` builds the batches of shard `index` of `count`:
  a grain IterDataset, or a MixtureData."""
  local, count = data_shards(shards, process_index, process_count)
  if len(local) == 1:  # one shard a process: the plain dataset (and its state format)
    return make(local[0], count, batch_size, prefetch)
  rows = batch_size // len(local)
  parts = [make(i, count, rows, 0) for i in local]
  if isinstance(parts[0], MixtureData):
    return MixtureData(_prefetched(_ShardBatches([p.dataset for p in parts]), prefetch),
                       parts[0].names)
  return _prefetched(_ShardBatches(parts), prefetch)


def _prefetched(ds, prefetch: int):
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


# One reader thread per source overlaps shard reads with packing. grain's default (16
# threads per source) made a 29-source mixture 30x slower on 2 cores (lock contention).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


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
    self._it.set_state(state["grain"])
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
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
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
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
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
  from jaxlm.data import prepare  # pylint: disable=import-outside-toplevel
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
