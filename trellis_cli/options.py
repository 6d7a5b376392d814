"""Command-line flags from an options dataclass, and the dataclass back from the parsed flags.

A long job's options dataclass (`QuantizeOptions`, `QatOptions`) is the one place its settings are
declared: each field's type, its default and, in its metadata, its help. So `--help`, the defaults a
command runs with and the defaults a library caller gets cannot drift apart. A field becomes the
flag `--field-name`:
- a bool defaulting to False: a switch `--name` that sets it; defaulting to True: `--no-name` that
  clears it (its help says what the switch does);
- a `Literal[...]`: one of its values (`choices`);
- an int, float or str, or one of them or None: a value of that type.
A field whose metadata holds `"flag": False` is a setting of the library only: no flag; the command
passes it to `options_from_arguments` or it keeps its default.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

Options = TypeVar("Options")


def flag_fields(options_type: type) -> list[dataclasses.Field]:
    """The fields of `options_type` that are flags, in declaration order (--help's order)."""
    return [field for field in dataclasses.fields(options_type) if field.metadata.get("flag", True)]


def add_option_flags(parser: argparse.ArgumentParser, options_type: type) -> None:
    """A flag for each flag field of the dataclass `options_type`, with the field's default."""
    types = get_type_hints(options_type)  # the annotations are strings under `from __future__`
    for field in flag_fields(options_type):
        flag = "--" + field.name.replace("_", "-")
        kind, help_text = types[field.name], field.metadata.get("help")
        if kind is bool and field.default:
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false",
                                help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag, choices=get_args(kind), default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=_value_type(kind), default=field.default, help=help_text)


def options_from_arguments(options_type: type[Options], args: argparse.Namespace,
                           **fixed: Any) -> Options:
    """The dataclass the parsed flags describe; `fixed` gives the fields that are not flags."""
    return options_type(**{field.name: getattr(args, field.name)
                           for field in flag_fields(options_type)}, **fixed)


def _value_type(kind: Any) -> type:
    """int for `int` and `int | None`, and so on; a type a flag cannot parse is a bug here."""
    values = [arm for arm in (get_args(kind) or (kind,)) if arm is not type(None)]
    if len(values) != 1 or values[0] not in (int, float, str):
        raise TypeError(f"no flag for a field of type {kind}; mark it {{'flag': False}}")
    return values[0]
