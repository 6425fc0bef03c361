"""Command lines: absl's flag parsing with one-line errors, and entry switches.

`parse_flags` is the `flags_parser` of research.train and research.evaluate: a bad
flag or override is one line and exit 2 (`usage_error`), and `--config.KIND.name=NAME`
switches a model, optimizer, schedule or loss section to another registry entry
(config.switch_entry) before that section's other overrides apply.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import ml_collections

from research.config import (
  ENTRY_SECTIONS,
  ConfigError,
  load_file,
  switch_entry,
  unknown_path_message,
)

_FLAG_VALUE_ERROR = re.compile(r"flag --config\.([\w.]+)=(.*?): (.*)", re.S)


def _load_for_message(spec: str) -> ml_collections.ConfigDict:
  try:
    return load_file(spec)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001  any failure inside the user's config file
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"config file {spec}: {type(e).__name__}: {first_line}") from None


def describe_flags_error(error: Exception, argv: list[str], config=None) -> str:
  """One line for a failure to parse the command line (bad override, bad flag);
  `config`: the one the overrides applied to (default: --config's file, loaded again)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config is None and spec:
    config = _load_for_message(spec)
  match = _FLAG_VALUE_ERROR.match(str(error))
  if match and config is not None:
    dotted, value, reason = match.groups()
    message = unknown_path_message(config, dotted)
    if message:
      return message
    node = config
    for key in dotted.split("."):
      node = node[key]
    reason = reason.strip().splitlines()[0]
    return (
      f"config.{dotted}: wrong type for value {value!r}: expected "
      f"{type(node).__name__} like {node!r} ({reason})"
    )
  if config is not None:
    for arg in argv:
      if arg.startswith("--config."):
        dotted = arg[len("--config.") :].split("=", 1)[0]
        message = unknown_path_message(config, dotted)
        if message:
          return message
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def usage_error(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag or override reported as one line and exit 2.

  `--config.KIND.name=NAME` for a model, optimizer, schedule or loss switches that
  section to another registry entry (switch_entry), and the section's other overrides
  apply to the new entry's keys."""
  from absl import flags

  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec and not Path(spec.partition(":")[0]).is_file():
    try:
      load_file(spec)
    except ConfigError as e:
      usage_error(str(e))
  switches = {
    kind: arg.split("=", 1)[1]
    for arg in argv
    for kind in ENTRY_SECTIONS
    if arg.startswith(f"--config.{kind}.name=")
  }
  held = [a for a in argv if any(a.startswith(f"--config.{k}.") for k in switches)]
  argv = [a for a in argv if a not in held]
  saved_argv, sys.argv = sys.argv, argv  # config_flags reads its overrides from sys.argv
  try:
    remaining = flags.FLAGS(argv)
    if switches:
      _switch_from_command_line(flags.FLAGS["config"].value, switches, held)
    return remaining
  except Exception as e:  # noqa: BLE001  config_flags raises many types
    if "--verbose" in argv:
      raise
    try:
      message = str(e) if isinstance(e, ConfigError) else describe_flags_error(e, argv)
    except ConfigError as described:
      message = str(described)
    usage_error(message)
  finally:
    sys.argv = saved_argv


def _switch_from_command_line(config, switches: dict[str, str], held: list[str]) -> None:
  """Applies --config.KIND.name switches, then the held overrides of those sections
  (ml_collections' own parsing, against the new entries' keys and types)."""
  from absl import flags, logging
  from ml_collections import config_flags

  if config is None:
    raise ConfigError(f"--config.{next(iter(switches))}.name: give --config=FILE.py first")
  notes = []
  for kind, name in switches.items():
    old_name = config[kind].name
    dropped = switch_entry(config, kind, name)
    if dropped:
      notes.append(
        f"config.{kind}.name={name}: {old_name}'s keys that {name} does not take are dropped: "
        + ", ".join(dropped)
      )
  overrides = [a for a in held if not any(a.startswith(f"--config.{k}.name=") for k in switches)]
  if overrides:
    sections = ml_collections.ConfigDict({kind: config[kind] for kind in switches})
    argv = ["research", *overrides]
    parsed = flags.FlagValues()
    try:  # defining the flag already reads the overrides
      config_flags.DEFINE_config_dict("config", sections, flag_values=parsed, sys_argv=argv)
      parsed(argv)
    except Exception as e:  # noqa: BLE001  config_flags raises many types
      raise ConfigError(describe_flags_error(e, argv, sections)) from None
    for kind in switches:
      config[kind] = parsed["config"].value[kind]
  for note in notes:  # after the overrides: a bad one is the only line
    logging.warning("%s", note)
