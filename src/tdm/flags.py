"""Command-line flags derived from a settings dataclass (fields made with tdm.config.setting): one
`--field-name` per field, with the field's type, default, help and argparse extras, so no flag is written twice."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

ARGPARSE_EXTRAS = ("metavar", "choices")  # field metadata passed on to add_argument besides help


def _flag_type(tp) -> dict:
    """argparse `type` (and `nargs` for a tuple) of a field type: int, float, str, tuple[X, ...], X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return {"type": typing.get_args(tp)[0], "nargs": "+"}
    if tp not in (int, float, str):
        raise TypeError(f"no command-line flag for a field of type {tp}")
    return {"type": tp}


def add_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    """One flag per field of the dataclass `settings`; a field with a default factory gets no argparse default
    (the dataclass computes it)."""
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        kwargs = {"help": f.metadata["help"], **_flag_type(hints[f.name]),
                  **{k: f.metadata[k] for k in ARGPARSE_EXTRAS if k in f.metadata}}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)


def from_flags(settings: type, args: argparse.Namespace):
    """The dataclass `settings` from parsed flags (add_flags); flags left at None keep the field's default."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings) if getattr(args, f.name) is not None}
    return settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
