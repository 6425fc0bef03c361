"""Orbax checkpoints of the train state, with the config and library versions beside it.

Saves are asynchronous: the train loop continues while the arrays are written.
`close()` waits for the last save (exiting with a save in flight hangs Orbax).
Restore always goes into an abstract target built on the current mesh.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str | Path, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, metadata: dict) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state):
    """Restores `state` at `step` onto the shardings that abstract_state carries."""
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]

  def metadata(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored["metadata"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(state_shape, shardings):
  """ShapeDtypeStructs that tell Orbax where each restored array goes."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shape, shardings
  )
