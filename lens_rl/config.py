"""Script configuration in the TRL convention.

Configs are dataclasses whose fields carry ``metadata={"help": ...}``. They are read with
:class:`trl.TrlParser`: ``--config file.yaml`` sets values first, command-line flags override
them. On top of TRL this module adds what TRL leaves out:

- YAML values are type-checked against the field annotations (argparse converts only
  command-line strings, so a YAML ``lr: fast`` would otherwise reach the code as a string);
- unknown YAML keys and unknown flags are errors (TRL's default, kept);
- each dataclass's own ``__post_init__`` checks combinations of values.

:func:`packaged_config` finds the YAML configs shipped with the package. trl and transformers
are imported inside the two functions that need them, so that ``lens-rl --help`` and the
configs of lighter modules do not pay for them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


def packaged_config(name: str) -> Path:
    """The path of a config shipped with the package (``lens_rl/configs/<name>``, the
    repository's ``configs/``)."""
    return Path(str(files("lens_rl") / "configs" / name))


class InputError(ValueError):
    """A user's input (a flag, a config value, a file) cannot be right; the message names it. The
    ``lens-rl`` command prints such errors without a traceback (exit status 2)."""


class ConfigError(InputError):
    """A configuration value or combination of values is invalid."""


def _matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value) for ``value`` against a field annotation."""
    origin = get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            ok, coerced = _matches(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(annotation), value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            return False, value
        args = get_args(annotation)
        if not args or (origin is tuple and len(args) != 1 and args[-1] is not Ellipsis):
            return True, value
        coerced = []
        for item in value:
            ok, c = _matches(item, args[0])
            if not ok:
                return False, value
            coerced.append(c)
        return True, type(value)(coerced) if origin is not Sequence else coerced
    if origin is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value  # annotations we do not model (callables, forward refs) pass through


def validate_types(obj: Any, only: set[str] | None = None) -> None:
    """Check every field of dataclass ``obj`` (or those named in ``only``) against its
    annotation; coerce int -> float.

    Raises:
        ConfigError: naming the field, the value, its type and the expected type.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or f.name not in hints or (only is not None and f.name not in only):
            continue
        value = getattr(obj, f.name)
        ok, coerced = _matches(value, hints[f.name])
        if not ok:
            raise ConfigError(
                f"{type(obj).__name__}.{f.name} = {value!r} ({type(value).__name__}) does not match "
                f"the expected type {hints[f.name]}. Fix the value in the YAML file or on the command line."
            )
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


class ValidatedConfig:
    """Mixin for config dataclasses: type-check fields, then run :meth:`validate`.

    Subclasses put cross-field checks in ``validate`` and raise :class:`ConfigError` with the
    field names, the values and the fix.
    """

    def __post_init__(self) -> None:
        validate_types(self)
        self.validate()

    def validate(self) -> None:
        """Check combinations of values; override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (for saving beside weights)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def sub_config(value: dict | str, cls: type[T], name: str) -> T:
    """Build the nested config ``cls`` from a YAML mapping or a JSON string, refusing unknown keys."""
    import json

    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    unknown = sorted(set(value) - set(cls.__dataclass_fields__))  # type: ignore[attr-defined]
    if unknown:
        raise ConfigError(
            f"Unknown {name} option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}."  # type: ignore[attr-defined]
        )
    return cls(**value)


def _json_mapping(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON object, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _accept_json_for_dict_fields(parser: Any, dataclass_types: Sequence[type]) -> None:
    """Let ``dict`` fields (nested sub-configs) take a JSON object on the command line.

    In YAML they are ordinary nested mappings; HfArgumentParser would call ``dict(text)``.
    """
    dict_fields = set()
    for dc in dataclass_types:
        for name, hint in typing.get_type_hints(dc).items():
            if hint is dict or get_origin(hint) is dict or dict in get_args(hint):
                dict_fields.add(name)
    for action in parser._actions:
        if action.dest in dict_fields:
            action.type = _json_mapping


def report_to_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``TrainingArguments.report_to`` as a list of tracker names, checked.

    Accepts a list (``--report_to wandb tensorboard``, a YAML list), a comma-separated string
    (``--report_to wandb,tensorboard``) or one name; ``"all"`` and ``"none"`` stand alone and
    keep their transformers meaning (every installed tracker; no tracker).

    Raises:
        ConfigError: naming ``report_to`` and the unknown names, with the known ones.
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    known = sorted(INTEGRATION_TO_CALLBACK)
    unknown = [name for name in names if name not in {*known, "all", "none"}]
    if unknown:
        raise ConfigError(
            f"report_to={value!r}: unknown tracker(s) {unknown}; known: 'all', 'none', "
            f"{', '.join(map(repr, known))}. Give a list (--report_to wandb tensorboard) or "
            "comma-separated names (--report_to wandb,tensorboard)."
        )
    if len(names) > 1 and {"all", "none"} & set(names):
        raise ConfigError(f"report_to={value!r}: 'all' and 'none' cannot be combined with other names.")
    return names


def _accept_lists_for_report_to(parser: Any) -> None:
    """Let ``--report_to`` take several names: HfArgumentParser reads the ``None | str |
    list[str]`` field as one string, so ``--report_to wandb tensorboard`` left ``tensorboard``
    unused. The configs' ``__post_init__`` splits commas and checks names (:func:`report_to_list`)."""
    for action in parser._actions:
        if action.dest == "report_to":
            action.nargs = "+"


def parse_args(
    dataclass_types: Sequence[type], args: Sequence[str] | None = None, typecheck: bool = True
) -> tuple[Any, ...]:
    """Parse ``--config x.yaml`` plus command-line overrides into the given dataclasses.

    Args:
        dataclass_types: the config dataclasses of a script, in order.
        args: argv without the program name (``None``: ``sys.argv[1:]``); tests pass a list.
        typecheck: type-check plain dataclasses' fields (off for TRL's large configs, which
            validate themselves in ``__post_init__``).

    Returns:
        One instance per dataclass type, type-checked (and, for :class:`ValidatedConfig`
        subclasses, validated by ``validate``).

    Raises:
        ConfigError: an unknown YAML key or flag, a value of the wrong type, or an invalid
            combination (the message says which field and how to fix it).
    """
    from trl import TrlParser

    parser = TrlParser(list(dataclass_types))
    _accept_json_for_dict_fields(parser, dataclass_types)
    _accept_lists_for_report_to(parser)
    try:
        parsed = parser.parse_args_and_config(args=list(args) if args is not None else None)
    except ConfigError:
        raise
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise ConfigError(
            "Invalid command-line or YAML value; argparse printed the offending argument above."
        ) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    for obj in parsed:
        if typecheck and not isinstance(obj, ValidatedConfig):
            validate_types(obj)
    return tuple(parsed)
