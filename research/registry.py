"""Name -> factory registries for models, datasets, optimizers, schedules, losses.

A config names what it wants (`config.model.name = "cnn"`); the registry finds
it. Registries fill themselves lazily by importing the modules that define
their entries, so `import research.registry` stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any


class UnknownNameError(ValueError):
  """A config named something no registry entry has."""


class Registry:
  """A name -> callable table, filled by importing `modules` on first use."""

  def __init__(self, kind: str, modules: tuple[str, ...]):
    self.kind = kind
    self._modules = modules
    self._entries: dict[str, Callable[..., Any]] = {}
    self._loaded = False

  def register(self, name: str):
    def decorator(fn):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn

    return decorator

  def _load(self):
    if not self._loaded:
      self._loaded = True
      for module in self._modules:
        importlib.import_module(module)

  def names(self) -> list[str]:
    self._load()
    return sorted(self._entries)

  def get(self, name: str) -> Callable[..., Any]:
    self._load()
    if name not in self._entries:
      close = difflib.get_close_matches(name, self._entries, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise UnknownNameError(
        f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}"
      )
    return self._entries[name]

  def parameters(self, name: str) -> dict[str, inspect.Parameter]:
    """Keyword arguments the entry accepts: the valid config keys beside `name`."""
    params = dict(inspect.signature(self.get(name)).parameters)
    # Flax modules are dataclasses: their construction-only fields are not config.
    for internal in ("parent", "name", "self"):
      params.pop(internal, None)
    return {
      key: p for key, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


models = Registry("model", ("research.models",))
datasets = Registry(
  "dataset",
  (
    "research.data.sources",
    "research.data.digits",
    "research.data.streaming",
    "research.data.text",
    "research.data.translation",
  ),  # fmt: skip
)
optimizers = Registry("optimizer", ("research.optim",))
schedules = Registry("schedule", ("research.optim",))
losses = Registry("loss", ("research.losses",))
evaluators = Registry(
  "evaluator",
  (
    "research.evaluators.basic",
    "research.evaluators.classification",
    "research.evaluators.fewshot",
  ),  # fmt: skip
)


def build_model(config, dataset):
  """The model `config.model` names, with what the data says (classes or vocabulary
  size, `dataset.model_kwargs`) and the compute dtype filled in."""
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  return models.get(config.model.name)(**kwargs, **dataset.model_kwargs, dtype=config.dtype)
