"""Meshes and logical-axis sharding, usable on any pytree.

Arrays carry logical axis names (`("embed", "mlp")`); an ordered rule table maps each
name to mesh axes. A name that no rule mentions is an error: nothing is silently
replicated. Typical use:

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    shardings = logical_to_sharding(axes_tree, mesh, rules)
    params = place(params, shardings)
    x = constrain(x, ("batch", "length", "embed"), mesh, rules)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jaxlm.config import MESH_AXES
from jaxlm.errors import ConfigError, ShardingError


Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Start `jax.distributed` when this process is one of several.

  Explicit arguments win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, then the cluster auto-detection JAX does itself (Cloud TPU, SLURM).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  auto = ("SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1) or (
      "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]) or (
          os.environ.get("JAXLM_DISTRIBUTED") == "auto")  # set by jaxlm.tpu on every worker
  if num_processes and num_processes > 1 and not (coordinator_address or auto):
    raise ShardingError(f"num_processes={num_processes} needs a coordinator: pass "
                        f"--coordinator_address HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
  if coordinator_address or auto:
    # Processes on CPU devices (tests, a laptop) exchange data through gloo; GPUs and TPUs
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for (data, fsdp, tensor); one may be -1 to take the remaining devices."""
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ShardingError("only one mesh axis may be -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
      raise ShardingError(f"the fixed axes ({known} devices) do not divide the {num_devices} "
                          f"devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ShardingError("data*fsdp*tensor = " + "*".join(map(str, shape)) +
                        f" = {int(np.prod(shape))}, but there are {num_devices} devices")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over all devices of all processes."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(sizes, len(devices))
  try:  # topology-aware device order (ICI rings on TPU) when the devices allow it
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> P:
  """Map one array's logical axis names to a PartitionSpec.

  For each dimension the first rule for its name whose mesh axes are not already used
  by an earlier dimension wins; if all its rules are used up the dimension is
  replicated. A name absent from the rules raises ShardingError.
  """
  known = {name for name, _ in rules}
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in known:
      raise ShardingError(f"logical axis {name!r} matches no sharding rule "
                          f"(add it to sharding.rules, with None to replicate)")
    chosen = None
    for rule_name, mesh_axes in rules:
      if rule_name != name:
        continue
      axes = _as_tuple(mesh_axes)
      if not used.intersection(axes):
        chosen = axes
        break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return P(*spec)


def is_axes(x) -> bool:
  """A leaf of a logical-axes tree: a tuple of names (or None)."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_to_sharding(axes_tree, mesh: Mesh, rules: Rules, shapes_tree=None):
  """A tree of logical-axes tuples -> a tree of NamedShardings.

  With `shapes_tree` (arrays or ShapeDtypeStructs of the same structure) every sharded
  dimension is checked to divide evenly, and a failure names the leaf's path.
  """
  def one(path, axes, shape=None):
    try:
      spec = logical_to_spec(axes, rules)
    except ShardingError as e:
      raise ShardingError(f"{jax.tree_util.keystr(path)}: {e}") from None
    if shape is not None:
      for dim, (size, mesh_axes) in enumerate(zip(shape.shape, spec)):
        n = int(np.prod([mesh.shape[a] for a in _as_tuple(mesh_axes)]))
        if size % n:
          raise ShardingError(
              f"{jax.tree_util.keystr(path)}: dimension {dim} ({axes[dim]}={size}) is not "
              f"divisible by mesh axes {mesh_axes} of size {n}")
    return NamedSharding(mesh, spec)

  if shapes_tree is None:
    return jax.tree_util.tree_map_with_path(one, axes_tree, is_leaf=is_axes)
  return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=is_axes)


def place(tree, shardings):
  """Put a host or device pytree onto the devices with the given shardings."""
  return jax.device_put(tree, shardings)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
              rules: Rules | None) -> jax.Array:
  """Constrain an activation inside jit; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes,
                                                                                 rules)))


class Sharder:
  """A mesh and its rules, passed explicitly to code that shards activations."""

  def __init__(self, mesh: Mesh, rules: Rules):
    self.mesh = mesh
    self.rules = tuple((name, axes) for name, axes in rules)

  def spec(self, logical_axes) -> P:
    return logical_to_spec(logical_axes, self.rules)

  def sharding(self, logical_axes) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  def constrain(self, x, logical_axes):
    return constrain(x, logical_axes, self.mesh, self.rules)

  def tree(self, axes_tree, shapes_tree=None):
    return logical_to_sharding(axes_tree, self.mesh, self.rules, shapes_tree)

  def placed(self, axes_tree, abstract_tree):
    """Shape/dtype structs of `abstract_tree`, each with its sharding by the rules: a
    restore target (runs.load_params) that lands already sharded."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, self.tree(axes_tree, abstract_tree))

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]


def global_batch(batch: dict, sharder) -> dict:
  """A batch every process holds whole -> global arrays sharded over (data, fsdp), each
  device taking its rows of it (for passes outside training: reference log-probs,
  scoring)."""
  def put(x):
    x = np.asarray(x)
    spec = sharder.sharding(("batch",) + (None,) * (x.ndim - 1))
    return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])
  return {k: put(v) for k, v in batch.items()}


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolve `config.mesh` (one size may be -1) against the device count; ConfigError
  naming `mesh.AXIS` when it can't be."""
  sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s}: mesh sizes must be positive or -1")
  try:
    shape = resolve_mesh_shape(sizes, num_devices)
  except ShardingError as e:
    raise ConfigError(f"mesh: {e}") from None
  return dict(zip(MESH_AXES, shape))
