"""The training loop every task shares.

A task hands over a `Task` (how to init params, its loss, its data); the loop does the
rest: mesh, sharded state, restore or init_from, the jitted step with gradient
accumulation, metrics, evaluation, checkpoints and SIGTERM.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import dataclasses
import os
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxlm import (attention, checkpoint, fileio, metrics as metrics_lib, optimizer, runs, sharding,
                   workdir as workdir_lib)
from jaxlm.errors import ConfigError, TrainingError


# loss_fn(params, batch, rng, frozen) -> (loss_sum, sums): `sums` is a dict of summed
# scalars that must include "weight", the count the sums are normalized by. `frozen` is
# the task's frozen tree (a LoRA base, for one), or None.
LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


@dataclasses.dataclass
class Task:
  init_params: Callable[[jax.Array], Any]     # rng -> params (pure, traced under jit)
  param_axes: Any                              # logical axes tree matching the params
  loss_fn: LossFn
  train_data: Any                              # grain IterDataset of per-process batches
  eval_data: Callable[[], Any] | None = None   # fresh grain IterDataset for each evaluation
  summarize: Callable[[dict], dict] = lambda m: m  # derived metrics from normalized sums
  tokens_per_batch: int = 0                    # global tokens per step, for throughput
  flops_per_token: float = 0.0                 # for MFU
  data_report: dict = dataclasses.field(default_factory=dict)  # counts for metrics.jsonl
  # How init_from becomes the first params: (path, params placed as wanted) -> params;
  # None when init_from feeds only the frozen tree (LoRA's adapters start fresh).
  load_init: Callable[[str, Any], Any] | None = runs.load_params
  # A frozen tree the loss reads but never trains (LoRA's base, DPO's reference):
  frozen_shapes: Callable[[jax.Array], Any] | None = None  # rng -> params (only traced)
  frozen_axes: Any = None
  frozen_source: Any = ""                     # the checkpoint or HF directory it loads from
                                              # (a dict of them for a dict of frozen trees)
  # RL: each step first makes its batch from the current params (generation, rewards),
  # rollout(params, frozen, host_batch, step) -> (device batch, host metrics), then runs
  # `epochs` passes of `minibatches` optimizer updates over it in one jitted step.
  rollout: Callable[[Any, Any, dict, int], tuple[dict, dict]] | None = None
  epochs: int = 1
  minibatches: int = 1
  # Once the run has trained to its last step (tasks.run): the reward model's statistics.
  after_training: Callable[[], Any] | None = None


def make_sharder(config) -> sharding.Sharder:
  mesh = sharding.make_mesh(sharding.mesh_shape(config, jax.device_count()))
  return sharding.Sharder(mesh, config.sharding.rules)


def state_shardings(sharder, param_axes, abstract_state):
  """Shardings for the train state: optimizer moments follow their params; the step, RNG
  and counters are replicated."""
  params_sh = sharder.tree(param_axes, abstract_state["params"])
  params_def = jax.tree.structure(abstract_state["params"])
  replicated = sharder.sharding(())

  def is_param_like(x):
    try:
      return jax.tree.structure(x) == params_def
    except Exception:  # pylint: disable=broad-except
      return False

  opt_sh = jax.tree.map(lambda x: params_sh if is_param_like(x) else replicated,
                        abstract_state["opt_state"], is_leaf=is_param_like)
  return {"params": params_sh, "opt_state": opt_sh,
          **{k: replicated for k in abstract_state if k not in ("params", "opt_state")}}


# long: one traced step (accumulation, update, epochs x minibatches) kept whole
def make_train_step(task: Task, tx, lr_schedule, accum_steps: int, sharder):
  """(state, frozen, batch) -> (state, metrics); batch leading axis is the global batch.
  With task.epochs x task.minibatches > 1, that many optimizer updates, each on a
  minibatch of a fresh permutation per epoch; metrics are their mean."""
  updates_per_step = task.epochs * task.minibatches

  def update(params, opt_state, count, frozen, batch, step_rng):
    def grads_and_sums(params, batch, rng):
      (objective, sums), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
          params, batch, rng, frozen)
      return grads, (objective, sums)

    if accum_steps == 1:
      grads, (objective, sums) = grads_and_sums(params, batch, step_rng)
    else:
      # Microbatch i takes rows i, i+A, i+2A, ...: every device keeps an equal share.
      def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
      micro = jax.tree.map(split, batch)

      def body(carry, inputs):
        mb, i = inputs
        mb = jax.tree.map(lambda x: sharder.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
        g, s = grads_and_sums(params, mb, jax.random.fold_in(step_rng, i))
        g32 = jax.tree.map(lambda a: a.astype(jnp.float32), g)
        return jax.tree.map(jnp.add, carry, (g32, s)), None

      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                           jax.eval_shape(grads_and_sums, params, jax.tree.map(lambda x: x[0], micro),
                                          step_rng))
      (grads, (objective, sums)), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, params)
    # Each gradient's sum of squares: the norm, and which gradient went non-finite first.
    squares = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32)))
                         for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(squares)
    ok = jnp.isfinite(objective) & jnp.all(finite)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    # A non-finite loss or gradient skips the update: params and optimizer state stay.
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    out = {k: v / weight for k, v in sums.items() if k != "weight"}
    out.update(weight=sums["weight"], grad_norm=jnp.sqrt(jnp.sum(squares)), lr=lr_schedule(count),
               nonfinite=(~ok).astype(jnp.int32),
               nonfinite_grad=jnp.where(ok, -1, jnp.argmin(finite)).astype(jnp.int32))
    return params, opt_state, out

  def step_fn(state, frozen, batch, layout=None):
    with attention.fixed_layout(layout):
      return steps(state, frozen, batch)

  def steps(state, frozen, batch):
    rng, step_rng = jax.random.split(state["rng"])
    first = state["step"] * updates_per_step
    if updates_per_step == 1:
      params, opt_state, out = update(state["params"], state["opt_state"], first, frozen, batch,
                                      step_rng)
    else:
      rows = jax.tree.leaves(batch)[0].shape[0]
      size = rows // task.minibatches
      order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(step_rng, e), rows)
                               for e in range(task.epochs)]).reshape(updates_per_step, size)

      def body(carry, xs):
        params, opt_state = carry
        i, idx = xs
        mb = jax.tree.map(
            lambda x: sharder.constrain(x[idx], ("batch",) + (None,) * (x.ndim - 1)), batch)
        params, opt_state, out = update(params, opt_state, first + i, frozen, mb,
                                        jax.random.fold_in(step_rng, 1000 + i))
        return (params, opt_state), out

      (params, opt_state), outs = jax.lax.scan(
          body, (state["params"], state["opt_state"]), (jnp.arange(updates_per_step), order))
      out = jax.tree.map(lambda x: jnp.mean(x, axis=0), outs)
      out["weight"] = jnp.sum(outs["weight"])
      out["nonfinite"] = jnp.max(outs["nonfinite"])  # any update skipped
      out["nonfinite_grad"] = jnp.max(outs["nonfinite_grad"])
    skipped = out["nonfinite"]
    consecutive = jnp.where(skipped > 0, state["consecutive_skips"] + 1, 0)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": rng, "skipped": state["skipped"] + skipped,
                 "consecutive_skips": consecutive}
    out.update(skipped_steps=new_state["skipped"], consecutive_skips=consecutive)
    return new_state, out

  return step_fn


def make_eval_step(task: Task):
  def eval_fn(params, frozen, batch, layout=None):
    with attention.fixed_layout(layout):
      _, sums = task.loss_fn(params, batch, None, frozen)  # no rng: no dropout
    return sums
  return eval_fn


def device_batch(batch: dict, sharder) -> dict:
  """A per-process numpy batch -> global arrays sharded over (data, fsdp)."""
  def put(x):
    spec = sharder.sharding(("batch",) + (None,) * (x.ndim - 1))
    return jax.make_array_from_process_local_data(spec, np.asarray(x))
  return {k: put(v) for k, v in batch.items()}


class _StopSignal:
  """SIGTERM, checked between steps.

  One process: a Python handler sets a flag. Several: JAX's preemption sync manager
  (started by `jax.distributed.initialize`) hears the signal on any process and makes
  every process agree on the same step to stop at.
  """

  def __init__(self):
    self.requested = False
    self.received = None  # time.monotonic() of the signal, or of the agreed stop
    self._previous = None
    self._multi = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or time.monotonic()
      return True
    return self.requested

  def __enter__(self):
    if self._multi:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    self.received = self.received or time.monotonic()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _all_processes_sum(counts: dict[str, int]) -> dict[str, int]:
  """Exact sums of Python ints over processes. Without x64 JAX gathers int32, so each
  count travels as four 16-bit parts (sums of up to 32,768 processes fit in int32)."""
  if jax.process_count() == 1:
    return counts
  parts = np.array([[(v >> (16 * i)) & 0xFFFF for i in range(4)] for v in counts.values()],
                   np.int32)
  summed = np.asarray(multihost_utils.process_allgather(parts)).astype(np.int64).sum(0)
  return {name: sum(int(summed[j, i]) << (16 * i) for i in range(4))
          for j, name in enumerate(counts)}


def _log_memory_plan(log, compiled):
  """XLA's memory plan for one train step, per device: what it holds and what it needs."""
  try:
    plan = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports one
    plan = None
  if plan is None:
    return
  gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
  log.info(f"train step memory per device: arguments {gib(plan.argument_size_in_bytes)} "
           f"(state, frozen weights, batch), temporaries {gib(plan.temp_size_in_bytes)}, "
           f"outputs {gib(plan.output_size_in_bytes)} of which "
           f"{gib(plan.alias_size_in_bytes)} reuse donated inputs")


def _peak_device_memory() -> int | None:
  """Peak bytes in use on the first local device (GPU, TPU); None where not reported."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API
    return None
  return (stats or {}).get("peak_bytes_in_use")


def _next_batch(data_iter, agree: bool):
  """The next host batch, or None when the data has run out. With `agree` (several
  processes whose shares may run out at different steps) every process learns whether
  any ran out, so all stop at the same step instead of waiting on each other forever."""
  try:
    batch = next(data_iter)
  except StopIteration:
    batch = None
  if agree:
    have = multihost_utils.process_allgather(np.array([batch is not None], np.int32))
    if not np.all(have):
      return None
  return batch


_device_layout_index = jax.jit(attention.layout_index)


def attention_layout(config, batch: dict, agree: bool) -> str | None:
  """The cuDNN attention kernel a batch needs (`attention.LAYOUTS`), so the step is
  compiled for it alone; None for the other attention implementations or batches without
  segment ids. A host batch is read on the host; with `agree`, every process takes the
  most general layout any process's share needs, so all run the same program. A batch
  that exists only on the devices (RL rollouts) is read there: one scalar comes back."""
  m = config.model
  if attention.resolve_impl(m.attention, m.dtype) != "cudnn" or "segment_ids" not in batch:
    return None
  if isinstance(batch["segment_ids"], jax.Array):  # global: the same answer everywhere
    return attention.LAYOUTS[int(_device_layout_index(batch["segment_ids"]))]
  index = int(attention.layout_index(np.asarray(batch["segment_ids"]), np))
  if agree:
    index = int(np.max(multihost_utils.process_allgather(np.array([index], np.int32))))
  return attention.LAYOUTS[index]


def _host(tree):
  return {k: float(v) for k, v in jax.device_get(tree).items()}


@dataclasses.dataclass
class Setup:
  """A run's sharded initial state and its jitted train and eval steps (not yet
  compiled). tools/bench.py times these very steps."""
  state: dict
  frozen_shardings: Any  # where the frozen tree (if any) must be placed
  train_step: Any
  eval_step: Any


def setup(config, task: Task, sharder: sharding.Sharder) -> Setup:
  """The optimizer over `config.steps`, fresh params placed on the mesh, and the steps."""
  updates_per_step = task.epochs * task.minibatches
  opt_cfg = config.optimizer
  if updates_per_step > 1:  # the schedule counts optimizer updates
    opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
    opt_cfg.warmup_steps *= updates_per_step
  tx, lr_schedule = optimizer.make(opt_cfg, config.steps * updates_per_step)

  def init_state(rng):
    params_rng, train_rng = jax.random.split(rng)
    params = task.init_params(params_rng)
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt_state": tx.init(params), "step": zero, "rng": train_rng,
            "skipped": zero, "consecutive_skips": zero}

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init_state, rng)
  shardings = state_shardings(sharder, task.param_axes, abstract)
  # Created already sharded: no device ever holds the whole state.
  state = jax.jit(init_state, out_shardings=shardings)(rng)
  frozen_sh = None
  if task.frozen_shapes is not None:
    like = sharder.placed(task.frozen_axes, jax.eval_shape(task.frozen_shapes, rng))
    frozen_sh = jax.tree.map(lambda x: x.sharding, like)
  # State in and out keeps its sharding and is donated, so the update happens in place.
  # Batches arrive already placed by `device_batch` (batch axis over data x fsdp), so
  # their in_sharding is taken from the arrays; metrics are small replicated scalars.
  # The frozen tree keeps its sharding and is not donated: every step reads it again.
  step_fn = make_train_step(task, tx, lr_schedule, config.optimizer.grad_accum_steps, sharder)
  # `layout` (static: one compilation each) names the cuDNN attention kernel the batch
  # needs, read by `attention_layout` (from the host copy, or for RL rollouts from the
  # device batch); None leaves it to the device.
  train_step = jax.jit(step_fn, in_shardings=(shardings, frozen_sh, None),
                       out_shardings=(shardings, None), donate_argnums=0,
                       static_argnums=3)
  eval_step = jax.jit(make_eval_step(task), in_shardings=(shardings["params"], frozen_sh, None),
                      static_argnums=3)
  return Setup(state, frozen_sh, train_step, eval_step)


def _failpoint(name: str, step: int):
  """Fault injection for tests (tests/faults): JAXLM_FAILPOINT=name:step kills this
  process with SIGKILL when it reaches point `name` at `step`. Points: "step" (the step
  dispatched, still running), "checkpoint" (its save started, the write in flight) and
  "eval" (midway through an evaluation)."""
  if os.environ.get("JAXLM_FAILPOINT") == f"{name}:{step}":
    os.kill(os.getpid(), signal.SIGKILL)


def _dump_nonfinite(workdir, step, m, params, host_batch) -> tuple[str, dict]:
  """What a non-finite step leaves for diagnosis, under <workdir>/nonfinite/step_<N>:
  report.json (loss, gradient norm, the first non-finite gradient and any non-finite
  parameters, by tree path) and this process's batch as batch_p<i>.npz."""
  out = os.path.join(workdir, "nonfinite", f"step_{step}")
  os.makedirs(out, exist_ok=True)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  first = int(m["nonfinite_grad"])
  bad_params = [p for p, x in zip(paths, jax.tree.leaves(params))
                if x.is_fully_addressable and not np.all(np.isfinite(np.asarray(x, np.float32)))]
  report = {"step": step, "loss": _finite_or_none(m.get("loss")),
            "grad_norm": _finite_or_none(m.get("grad_norm")),
            "first_nonfinite_gradient": paths[first] if first >= 0 else None,
            "nonfinite_parameters": bad_params,
            "consecutive_skips": int(m["consecutive_skips"])}
  if jax.process_index() == 0:
    fileio.atomic_write_json(os.path.join(out, "report.json"), report)
  if host_batch is not None:
    arrays = {k: np.asarray(v) for k, v in host_batch.items()
              if not isinstance(v, jax.Array) or v.is_fully_addressable}
    np.savez(os.path.join(out, f"batch_p{jax.process_index()}.npz"), **arrays)
  return out, report


def _finite_or_none(x):
  return float(x) if x is not None and np.isfinite(float(x)) else None


def train(config, workdir: str, task: Task, sharder: sharding.Sharder) -> dict:
  """Run (or resume) training; returns the last logged metrics."""
  with _StopSignal() as stop:  # from here on, SIGTERM ends the run with a checkpoint
    return _train(config, workdir, task, sharder, stop)


@dataclasses.dataclass
class _Run:
  """What a run holds from its start to its end: the task, the jitted steps, the frozen
  tree, and where it writes (metrics, checkpoints)."""
  config: Any
  workdir: str
  task: Task
  sharder: sharding.Sharder
  stop: _StopSignal
  log: metrics_lib.MetricsWriter
  ckpt: checkpoint.Checkpointer
  data_iter: Any
  train_step: Any           # jitted, compiled per attention layout into `compiled`
  eval_step: Any
  frozen: Any               # the frozen tree the loss reads, or None
  start: int                # the first step this process runs (0, or the restored step)
  peak_total: float | None  # peak FLOP/s of all devices, for MFU
  agree_on_end: bool        # processes agree on when the data runs out (see _next_batch)
  compiled: dict = dataclasses.field(default_factory=dict)  # attention layout -> step


class _LossWatch:
  """Loss spikes: a logged loss over loss_spike_factor x the mean of the last
  loss_spike_window logged losses that were not spikes themselves (those kept from
  before a resume included, so a resumed run reports the same events).

  The window starts with the first step's loss (the model as initialized), so spikes
  show from the first logged step on. A cross-entropy loss (one that reports `nll`:
  pretraining, SFT) over loss_spike_factor**2 x that mean is a divergence: no checkpoint
  is written while it lasts (see _may_save). Other tasks' losses (DPO, reward, RL) are
  not on a scale where a ratio says the model is dead; their spikes are events only.
  """

  def __init__(self, config, log):
    self.factor = config.loss_spike_factor
    spiked = {step for step, _ in log.history("event/loss_spike")}
    kept = dict(log.history("initial_loss"))
    kept.update((step, v) for step, v in log.history("loss") if step not in spiked)
    self.recent = collections.deque((kept[step] for step in sorted(kept)),
                                    maxlen=config.loss_spike_window)
    self.diverged = None  # (step, loss, mean) while the last logged loss is a divergence

  def observe(self, step: int, m: dict, log):
    """Reads one logged record's loss: a spike is an event, anything else joins the window."""
    loss = m.get("loss")
    if loss is None or not np.isfinite(loss):
      return
    if self.factor and self.recent:
      mean = float(np.mean(self.recent))
      if mean > 0 and loss > self.factor * mean:
        log.info(f"step {step}: loss spike, {loss:.4f} is {loss / mean:.1f}x the mean of "
                 f"the last {len(self.recent)} logged losses ({mean:.4f})")
        log.write(step, {"event/loss_spike": loss / mean}, console=False)
        if "nll" in m and loss > self.factor ** 2 * mean:
          self.diverged = (step, loss, mean)
        return
    self.diverged = None
    self.recent.append(loss)


@dataclasses.dataclass
class _Progress:
  """The loop's running state, carried from one step to the next."""
  state: dict               # the train state the last dispatched step returns
  # Dispatch is asynchronous, so the host clock means something only where the host has
  # waited for the device: throughput runs from one fetched step to the next.
  synced_step: int
  synced_time: float
  spikes: _LossWatch
  saved_step: int           # the newest checkpoint's step (the start step before any)
  last: dict = dataclasses.field(default_factory=dict)  # the last logged metrics
  pending: tuple | None = None    # (step, metrics) to log once the next step is dispatched
  unchecked: tuple | None = None  # (step, metrics, host batch) not yet checked finite
  stopped_by: str | None = None   # "signal", "data", or None (ran all its steps)

  def sync(self, step: int):
    self.synced_step, self.synced_time = step, time.perf_counter()


@dataclasses.dataclass
class _StepInput:
  """What one step trains on: a host batch placed on the mesh, or (RL) a batch a rollout
  made on the devices from the current params, with the rollout's host metrics."""
  batch: dict                       # device arrays
  layout: str | None                # the cuDNN attention kernel it needs (attention_layout)
  rollout_metrics: dict | None = None  # None: the batch came from the data
  update_started: float = 0.0       # when the rollout handed the batch over

  @property
  def waited(self) -> bool:
    """Whether the step has finished once `finish` returns (the rollout waited for it)."""
    return self.rollout_metrics is not None

  def finish(self, m: dict) -> dict:
    """The step's metrics. A data step is left running; after a rollout the host waits
    (the next rollout needs these params anyway), times the update and adds the
    rollout's metrics."""
    if self.rollout_metrics is None:
      return m
    jax.block_until_ready(m)
    self.rollout_metrics["time/update_s"] = time.perf_counter() - self.update_started
    return {**m, **self.rollout_metrics}


def _step_input(run: _Run, state: dict, host_batch: dict, step: int) -> _StepInput:
  """The batch step `step` trains on: the host batch itself, or what the task's rollout
  (generate, score) makes of it with the current params."""
  if run.task.rollout is None:
    return _StepInput(device_batch(host_batch, run.sharder),
                      attention_layout(run.config, host_batch, jax.process_count() > 1))
  batch, rollout_metrics = run.task.rollout(state["params"], run.frozen, host_batch, step)
  update_started = time.perf_counter()
  return _StepInput(batch, attention_layout(run.config, batch, False), rollout_metrics,
                    update_started)


def _compiled_step(run: _Run, state: dict, step_input: _StepInput):
  """The train step compiled for the input's attention layout, compiled explicitly the
  first time a layout appears, to report the step's memory plan."""
  layout = step_input.layout
  if layout not in run.compiled:
    if run.compiled:
      run.log.info(f"compiling the step for attention layout {layout!r}")
    run.compiled[layout] = run.train_step.lower(state, run.frozen, step_input.batch,
                                                layout).compile()
    _log_memory_plan(run.log, run.compiled[layout])
  return run.compiled[layout]


def _start(config, workdir, task, sharder, stop) -> tuple[_Run, dict]:
  """The run's steps and writers, and its first state: restored from the newest
  checkpoint (with the data position), else from init_from, else fresh; with the frozen
  tree loaded."""
  s = setup(config, task, sharder)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)
  data_iter = iter(task.train_data)
  notes = []  # said once the metrics writer exists (it keeps records up to the restored step)
  start, state, data_state = ckpt.restore_latest(s.state, notes.append)
  log = metrics_lib.MetricsWriter(workdir, total_steps=config.steps, start_step=start,
                                  progress=config.progress, wandb=config.get("logging"),
                                  run_config=config.to_dict())
  for note in notes:
    log.info(note)
  if start is not None:
    if data_state is not None:
      data_iter.set_state(data_state)
    log.info(f"resumed from {ckpt.directory}/{start}")
  else:
    start = 0
    if config.init_from and task.load_init is not None:
      try:
        state["params"] = task.load_init(config.init_from, state["params"])
      except FileNotFoundError as e:
        raise ConfigError(f"init_from: {e}") from None
      log.info(f"initialized params from {config.init_from}")
  frozen = _load_frozen(config, task, sharder, log)
  if task.data_report and start == 0:  # records read, used, skipped, truncated
    log.write(start, task.data_report, console=False)
  _log_sizes(log, state["params"], frozen, sharder)
  peak = metrics_lib.peak_flops_per_device(config.peak_tflops)
  run = _Run(config=config, workdir=workdir, task=task, sharder=sharder, stop=stop, log=log,
             ckpt=ckpt, data_iter=data_iter, train_step=s.train_step, eval_step=s.eval_step,
             frozen=frozen, start=start,
             peak_total=peak * jax.device_count() if peak else None,
             agree_on_end=jax.process_count() > 1 and config.data.on_exhausted == "stop")
  return run, state


def _load_frozen(config, task: Task, sharder, log):
  """The task's frozen tree, or None; loaded on every start: checkpoints hold only `params`."""
  if task.frozen_shapes is None:
    return None
  rng = jax.random.PRNGKey(config.seed)
  like = sharder.placed(task.frozen_axes, jax.eval_shape(task.frozen_shapes, rng))
  try:
    if isinstance(task.frozen_source, dict):  # several frozen models, one source each
      frozen = {k: runs.load_params(task.frozen_source[k], like[k]) for k in like}
    else:
      frozen = runs.load_params(task.frozen_source, like)
  except FileNotFoundError as e:
    raise ConfigError(f"init_from: {e}") from None
  log.info(f"frozen weights loaded from {task.frozen_source}")
  return frozen


def _log_sizes(log, params, frozen, sharder):
  """Parameter counts, mesh and devices, said once at the start."""
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  if frozen is not None:
    n_frozen = sum(int(x.size) for x in jax.tree.leaves(frozen))
    log.info(f"{n_frozen:,} frozen parameters, {n_params:,} trained "
             f"({100 * n_params / n_frozen:.2f}%)")
  log.info(f"{n_params:,} parameters; mesh {dict(sharder.mesh.shape)}; "
           f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
           f"{jax.process_count()} process(es)")


def _train(config, workdir, task, sharder, stop) -> dict:
  """Start (or resume), then step until config.steps, SIGTERM or the end of the data.
  Each step is dispatched before the previous one's metrics are fetched, so the device
  always has work queued; see _after_step for logging, evaluation and checkpoints."""
  run, state = _start(config, workdir, task, sharder, stop)
  progress = _Progress(state, synced_step=run.start, synced_time=time.perf_counter(),
                       spikes=_LossWatch(config, run.log), saved_step=run.start)
  if run.start == 0 and config.eval_on_start and config.eval_every:
    ev = _evaluate(run, state["params"], 0)  # the starting point of the held-out curve
    if ev:
      run.log.write(0, ev)
    progress.sync(0)
  try:
    for step in range(run.start, config.steps):
      if stop.should_stop(step):
        run.log.info(f"SIGTERM: saving checkpoint at step {step} and exiting")
        progress.stopped_by = "signal"
        break
      host_batch = _next_batch(run.data_iter, run.agree_on_end)
      if host_batch is None:  # data.on_exhausted="stop"
        run.log.info(f"training data exhausted after step {step}: stopping")
        progress.stopped_by = "data"
        break
      step_input = _step_input(run, progress.state, host_batch, step)
      train_step = _compiled_step(run, progress.state, step_input)
      progress.state, m = train_step(progress.state, run.frozen, step_input.batch)
      done = step + 1
      _failpoint("step", done)
      _check_finite(run, progress)  # the previous step's, read one step late: the device keeps busy
      progress.unchecked = (done, m, host_batch)
      m = step_input.finish(m)
      if step == run.start:
        _first_step_done(run, progress, done, m)
      _after_step(run, progress, done, m, step_input.waited)
      run.log.advance(done)
    final = _finish(run, progress)
  finally:
    run.ckpt.close()  # the last write completes (or its failure is raised) before any exit
    if hasattr(run.data_iter, "close"):
      run.data_iter.close()
  _report_end(run, progress, final)
  return progress.last


def _first_step_done(run: _Run, progress: _Progress, done: int, m: dict):
  """The first step of this process (compile + run) is timed apart, and throughput counts
  from its end. A fresh run's first loss (the model as initialized) is the spike window's
  first entry, recorded unless that step is logged anyway."""
  jax.block_until_ready(m)
  run.log.info(f"first step (compile + run) took {time.perf_counter() - progress.synced_time:.1f}s")
  progress.sync(done)
  if run.start == 0 and done % run.config.log_every and done != run.config.steps:
    first_loss = float(jax.device_get(m["loss"]))
    if np.isfinite(first_loss):
      run.log.write(done, {"initial_loss": first_loss}, console=False)
      progress.spikes.recent.append(first_loss)


def _after_step(run: _Run, progress: _Progress, done: int, m: dict, finished: bool):
  """Once step `done` is dispatched: log the previous log step (fetched only now), keep
  this one to log after the next dispatch (at once if it has `finished`), and evaluate and
  checkpoint when due; a step is checked finite and logged before it is evaluated or
  saved."""
  config = run.config
  _log_pending(run, progress)
  if done % config.log_every == 0 or done == config.steps:
    progress.pending = (done, m)
    if finished:
      _log_pending(run, progress)
  evaluate_now = config.eval_every and (done % config.eval_every == 0 or done == config.steps)
  saving = done % config.checkpoint_every == 0 and done < config.steps
  if evaluate_now or saving:
    _check_finite(run, progress)  # nothing non-finite is evaluated or saved
    _log_pending(run, progress)  # its record before its checkpoint
  if evaluate_now and not run.stop.requested:
    ev = _evaluate(run, progress.state["params"], done)
    if ev:
      run.log.write(done, ev)
      progress.last.update(ev)
    jax.block_until_ready(progress.state["step"])
    progress.sync(done)  # evaluation is not training time
  if saving and _may_save(run, progress, done):
    run.ckpt.save(done, progress.state, run.data_iter.get_state())
    progress.saved_step = done
    _failpoint("checkpoint", done)


def _finish(run: _Run, progress: _Progress) -> int:
  """After the last step: its checks and record, the final checkpoint, and after SIGTERM
  how long the save took against the preemption notice. Returns the final step."""
  _check_finite(run, progress)
  _log_pending(run, progress)
  final = int(jax.device_get(progress.state["step"]))
  if final != progress.saved_step and _may_save(run, progress, final):
    run.ckpt.save(final, progress.state, run.data_iter.get_state())
    progress.saved_step = final
  if progress.stopped_by == "signal":
    config = run.config
    run.ckpt.wait()
    took = time.monotonic() - run.stop.received
    note = "" if took <= config.preemption_grace_s else (
        f"; WARNING: over preemption_grace_s={config.preemption_grace_s:g}, so a "
        f"preemption with that notice would have cut it short")
    run.log.info(f"SIGTERM: checkpoint at step {progress.saved_step} complete {took:.1f}s "
                 f"after the signal{note}")
  return final


def _report_end(run: _Run, progress: _Progress, final: int):
  """The run's closing records: peak memory, tokens per source, and summary.json (what a
  pipeline or a sweep reads back)."""
  log = run.log
  peak = _peak_device_memory()
  if peak is not None:
    log.info(f"peak device memory: {peak / 2**30:.2f} GiB (device 0)")
    log.write(final, {"peak_memory_gib": peak / 2**30}, console=False)
  if hasattr(run.data_iter, "consumed_tokens"):
    consumed = _all_processes_sum(run.data_iter.consumed_tokens())
    total_tokens = max(sum(consumed.values()), 1)
    log.info("tokens consumed per source: " + ", ".join(
        f"{n} {v:,} ({100 * v / total_tokens:.1f}%)" for n, v in consumed.items()))
    log.write(final, {f"tokens_consumed/{n}": v for n, v in consumed.items()}, console=False)
  log.close()
  if jax.process_index() == 0:
    summary = {"step": final, "steps": run.config.steps, "finished": final >= run.config.steps,
               "stopped_by": progress.stopped_by, "tokens_per_step": run.task.tokens_per_batch,
               "metrics": progress.last}
    fileio.atomic_write_json(os.path.join(run.workdir, "summary.json"), summary)


def _log_pending(run: _Run, progress: _Progress):
  """Log the pending step's metrics, if any (this waits until that step has finished)."""
  if progress.pending is None:
    return
  step, m = progress.pending
  progress.pending = None
  m = _host(m)
  now = time.perf_counter()
  steps, elapsed = step - progress.synced_step, now - progress.synced_time
  progress.synced_step, progress.synced_time = step, now
  for k in ("weight", "nonfinite", "nonfinite_grad", "consecutive_skips"):
    m.pop(k, None)
  m = run.task.summarize(m)
  tps = steps * run.task.tokens_per_batch / elapsed if steps > 0 and elapsed > 0 else None
  m["tokens_per_s"] = tps
  m["mfu"] = (tps * run.task.flops_per_token / run.peak_total) if (run.peak_total and tps) else None
  run.log.write(step, m)
  progress.spikes.observe(step, m, run.log)
  progress.last = m


def _evaluate(run: _Run, params, step: int) -> dict:
  """config.eval_steps batches of fresh eval data: the task's summary of the normalized
  sums, as eval_<name>; {} without eval data."""
  config, task = run.config, run.task
  if task.eval_data is None or not config.eval_steps:
    return {}
  it = iter(task.eval_data())
  sums = None
  for i in range(config.eval_steps):
    b = next(it)
    s = run.eval_step(params, run.frozen, device_batch(b, run.sharder),
                      attention_layout(config, b, jax.process_count() > 1))
    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    if i == 0:
      _failpoint("eval", step)
  if hasattr(it, "close"):
    it.close()
  sums = _host(sums)
  weight = max(sums.pop("weight"), 1.0)
  summary = task.summarize({k: v / weight for k, v in sums.items()})
  return {f"eval_{k}": v for k, v in summary.items()}


def _may_save(run: _Run, progress: _Progress, step: int) -> bool:
  """Whether `step` may be checkpointed: not while the last logged loss is a divergence,
  so a dead model never takes the place of the last healthy checkpoint. Under
  nan_policy="stop" the run ends there, as it does on a non-finite loss."""
  if progress.spikes.diverged is None:
    return True
  config = run.config
  at, loss, mean = progress.spikes.diverged
  what = (f"the loss diverged at step {at} ({loss:.4g}, {loss / mean:.1f}x the mean of the "
          f"last {len(progress.spikes.recent)} logged losses, over loss_spike_factor**2="
          f"{config.loss_spike_factor ** 2:g})")
  saved = progress.saved_step
  kept = (f"the newest checkpoint, step {saved}, is kept as it was" if saved
          else "no checkpoint was written")
  if config.nan_policy == "stop":
    raise TrainingError(f"step {step}: {what}; stopped before checkpointing it "
                        f"(nan_policy=stop); {kept}")
  run.log.info(f"step {step}: not checkpointed, {what}; {kept}")
  return False


def _check_finite(run: _Run, progress: _Progress):
  """The unchecked step, if any (read one step late, so the device keeps a step queued):
  a skipped update is counted, and ends the run under nan_policy="stop" or past
  max_skipped_steps in a row."""
  if progress.unchecked is None:
    return
  step, m, host_batch = progress.unchecked
  progress.unchecked = None
  config = run.config
  m = jax.device_get({k: m[k] for k in ("nonfinite", "nonfinite_grad", "consecutive_skips",
                                        "loss", "grad_norm") if k in m})
  if not int(m["nonfinite"]):
    return
  run_of = int(m["consecutive_skips"])
  if config.nan_policy == "skip" and run_of <= config.max_skipped_steps:
    run.log.info(f"step {step}: non-finite loss or gradients; update skipped "
                 f"({run_of} in a row, at most {config.max_skipped_steps})")
    return
  where, report = _dump_nonfinite(run.workdir, step, m, progress.state["params"], host_batch)
  name = report["first_nonfinite_gradient"] or "none (the loss itself)"
  why = ("nan_policy=stop" if config.nan_policy == "stop" else
         f"{run_of} skipped updates in a row, over max_skipped_steps={config.max_skipped_steps}")
  raise TrainingError(f"step {step}: non-finite loss ({m.get('loss')}) or gradients, first "
                      f"non-finite gradient {name}; stopped ({why}); diagnostics in {where}")


def write_config(config, workdir: str):
  """config.json, once the workdir is checked against what it holds (workdir.check, on
  every process, so that all stop together); written by process 0."""
  workdir_lib.check(config, workdir)
  if jax.process_index() == 0:
    workdir_lib.write_config(config, workdir)
