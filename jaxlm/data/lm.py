"""Language-model batches: documents -> tokens -> packed rows -> batches, through grain.

Each document is wrapped in BOS ... EOS, documents are concatenated and split into
rows of seq_len + 1 tokens, and each row becomes

    tokens[T], targets[T], loss_mask[T], segment_ids[T], positions[T]

where a target counts only when it belongs to the same document as its input. The
iterator's state (`get_state`/`set_state`) is JSON and goes into every checkpoint.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer_path: str):
    self.tokenizer_path = tokenizer_path
    self._tok = None

  def map(self, text: str):
    if self._tok is None:  # built lazily so the transform pickles into grain workers
      self._tok = Tokenizer(self.tokenizer_path)
    tok = self._tok
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    return {"tokens": np.asarray(ids, np.int32)}


def row_to_example(row: dict) -> dict:
  """A packed row of T+1 tokens -> model inputs and shifted targets of length T."""
  tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
  return {
      "tokens": tokens[:-1],
      "targets": tokens[1:],
      "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] != 0)).astype(np.int32),
      "segment_ids": seg[:-1].astype(np.int32),
      "positions": pos[:-1].astype(np.int32),
  }


def lm_dataset(docs: DocumentSource, tokenizer_path: str, *, seq_len: int, batch_size: int,
               seed: int, shuffle: bool, process_index: int = 0, process_count: int = 1,
               prefetch: int = 0) -> grain.IterDataset:
  """An endless, checkpointable stream of packed LM batches for this process.

  `batch_size` is the per-process batch. Every epoch is reshuffled; process i reads
  documents i, i + n, i + 2n, ... of the shuffled, repeated order.
  """
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)[process_index::process_count]
  ds = ds.map(_Tokenize(tokenizer_path)).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  ds = ds.map(row_to_example).batch(batch_size, drop_remainder=True)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds
