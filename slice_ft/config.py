"""YAML + command line: `--config X.yaml` whose keys are flag names; flags given on the command line win."""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Sequence
from typing import Any, Optional

import yaml

CONFIG_FLAG = "config"


def _flag_map(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling a YAML key may use -> its action: the dest and each long option without dashes (aliases)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", CONFIG_FLAG):
            continue
        out[action.dest] = action
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
                out[opt[2:].replace("-", "_")] = action
    return out


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML config file, with clear errors for a missing or malformed file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} does not exist; pass the path of a YAML file such as configs/demo.yaml")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path!r} is not valid YAML ({err}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value checked and converted like argparse would treat the same value on the command line."""
    where = f"{key!r} in {path!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, (list, tuple)) else [value]
    if not many and isinstance(value, (list, tuple)):
        raise ValueError(f"{where} takes a single value, got the list {value!r}")
    converted = []
    for item in items:
        if action.type is not None and not isinstance(item, bool):
            try:
                item = action.type(item) if isinstance(item, str) or action.type in (int, float) else item
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"{where}: {item!r} is not a valid value ({err})") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where} is {item!r}; choose one of {list(action.choices)}")
        converted.append(item)
    return converted if many else converted[0]


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv` with the YAML file named by `--config` as defaults (command-line flags override it).

    YAML keys are flag names (`learning_rate`, `ff`, ...); an unknown key is an error naming the closest flag.
    """
    pre, _ = parser.parse_known_args(argv)
    path = getattr(pre, CONFIG_FLAG, None)
    if path:
        flags = _flag_map(parser)
        defaults: dict[str, Any] = {}
        for key, value in load_yaml_config(path).items():
            action = flags.get(str(key))
            if action is None:
                close = difflib.get_close_matches(str(key), list(flags), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "; run with --help for the flag names"
                raise ValueError(f"unknown key {key!r} in --config {path!r}{hint}")
            if action.dest in defaults:
                raise ValueError(f"{path!r} sets {action.dest!r} twice (through {key!r}); keep one of the spellings")
            defaults[action.dest] = _convert(action, str(key), value, path)
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)
