"""Run settings as YAML: `embedtune train --config run.yaml`, and the resolved config.yaml a run saves.

Reading: the file's keys become the train command's defaults through the CLI context's
``default_map``, so an explicit command-line flag always wins over the file, which wins over the
built-in default. Keys may be spelled like the flag (``max-steps``, ``--max-steps``) or like the
parameter (``max_steps``). Nothing here lists the command's flags: they are read from the command
itself, so flags added later work without touching this module. Keys may also name a
:class:`~embedtune.train.TrainConfig` field: fields the command spells differently are translated
(``FIELD_TO_PARAM``), and fields with no flag at all (``warmup_ratio``, ``logging_steps``, ...) are
applied to the config the command builds, unless the command set that field itself. So the
``config.yaml`` a run saves (TrainConfig's fields) reads back as the same settings.

Every problem (unreadable file, bad YAML, unknown key, wrong type) is one
:class:`~embedtune.errors.EmbedtuneError` line naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedtune.errors import EmbedtuneError

CONFIG_NAME = "config.yaml"
_META_KEY = "embedtune.config_fields"  # ctx.meta slot for the file's flag-less TrainConfig fields
# Run-handling switches rather than settings of the run: never saved, so replaying a saved config
# can't silently replace the run folder it came from.
NOT_SAVED = ("overwrite", "resume")


def _same(value):
    return value


def _negate(value):
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return not value


def _checkpointing_flag(value):
    if value is True or value is False:
        return value
    if value == "unsloth":
        return True
    raise TypeError('expected true, false or "unsloth"')


def _comma_joined(value):
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ",".join(map(str, value))
    if isinstance(value, str):
        return value
    raise TypeError("expected a list of whole numbers or comma-separated text")


# TrainConfig fields that `embedtune train` spells differently: field -> (parameter, value -> its value).
FIELD_TO_PARAM: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "output_dir": ("output", _same),
    "evals_per_run": ("evals", _same),
    "eval": ("no_eval", _negate),
    "fast": ("no_fast", _negate),
    "gradient_checkpointing": ("gradient_checkpointing", _checkpointing_flag),
    "matryoshka_dims": ("matryoshka_dims", _comma_joined),  # a list in TrainConfig, "384,256" on the command line
}
# TrainConfig values the command expresses with another flag: (field, value) -> (parameter, its value).
VALUE_TO_PARAM: dict[tuple[str, Any], tuple[str, Any]] = {
    ("lora_r", None): ("full", True),
}


# --------------------------------------------------------------------------------------------------
# Reading


def read_yaml_mapping(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """The top-level mapping of a YAML file, and the line of each key; safe_load only.

    An empty file is an empty mapping. Duplicate keys are an error (PyYAML would keep the last).
    """
    import yaml

    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise EmbedtuneError(f"{name}: no such file")
    if p.is_dir():
        raise EmbedtuneError(f"{name}: is a folder; give a YAML file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EmbedtuneError(f"{name}: invalid UTF-8 at byte {e.start + 1}") from None
    except OSError as e:
        raise EmbedtuneError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: positions, no objects built
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e)
        raise EmbedtuneError(f"{where}: invalid YAML: {' '.join(str(problem).split())}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise EmbedtuneError(f"{name}: expected a mapping of setting: value, got {kind}")
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a complex key: reported as a bad key below
        line = key_node.start_mark.line + 1
        key = key_node.value
        if key in lines:
            raise EmbedtuneError(f"{name}:{line}: {key!r} is set twice (first on line {lines[key]})")
        lines[key] = line
        if isinstance(value_node, yaml.MappingNode):  # `data:`'s data sets: a mistake in one names its line
            for child, _ in value_node.value:
                if isinstance(child, yaml.ScalarNode):
                    lines.setdefault(f"{key}.{child.value}", child.start_mark.line + 1)
    return data, lines


def _command_function(ctx) -> Callable | None:
    callback = getattr(ctx.command, "callback", None)
    return inspect.unwrap(callback) if callback is not None else None


def _type_hints(obj) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an unresolvable annotation: fall back to the command's own checks
        return {}


def load_config_defaults(ctx, param, path: str | os.PathLike | None, fields_of: type | None = None) -> None:
    """A `--config` option callback's work: put the file's settings into ``ctx.default_map``.

    ``ctx`` is the click/typer context of the command being parsed, ``param`` the --config parameter
    itself (eager, so it runs before the others read their defaults). ``fields_of`` is the dataclass
    (TrainConfig) whose flag-less fields the file may also set; see :func:`apply_config_fields`.
    """
    if path is None:
        return
    name = os.fspath(path)
    data, lines = read_yaml_mapping(name)
    params = {
        p.name: p for p in ctx.command.params
        if p is not param and p.name and getattr(p, "expose_value", True) and not getattr(p, "is_eager", False)
    }
    hints = _type_hints(_command_function(ctx))
    field_hints = _type_hints(fields_of) if fields_of is not None else {}
    fields = {f.name: f for f in dataclasses.fields(fields_of)} if fields_of is not None else {}

    defaults: dict[str, Any] = {}
    set_by: dict[str, str] = {}  # parameter or field -> the key that set it, to catch two spellings
    file_fields: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{name}:{lines[key]}" if key in lines else name
        if not isinstance(key, str):
            raise EmbedtuneError(f"{where}: keys must be setting names, got {key!r}")
        norm = key.strip().lstrip("-").replace("-", "_")
        if norm == "data" and fields_of is not None and "data" in fields:
            if isinstance(value, dict):  # name -> file or {path, loss}: no flag spells it, the field takes it
                file_fields["data"] = _data_mapping(name, lines, key, value)
                set_by["data"] = key
                continue
            if isinstance(value, str):  # the data argument takes a list of files
                value = [value]
        by_value = _value_target(norm, value)
        if by_value is not None and by_value[0] in params:
            target, value = by_value
        elif norm in FIELD_TO_PARAM and FIELD_TO_PARAM[norm][0] in params:
            target, convert = FIELD_TO_PARAM[norm]
            try:
                value = convert(value)
            except TypeError as e:
                raise EmbedtuneError(f"{where}: {key}: {e}, got {_show(value)}") from None
        elif norm in params:
            target = norm
        elif norm in fields:
            value = _check_value(where, key, value, field_hints.get(norm, Any))
            if norm in set_by:
                raise EmbedtuneError(f"{where}: {key!r} repeats {set_by[norm]!r}")
            set_by[norm] = key
            file_fields[norm] = value
            continue
        elif norm == param.name or norm in {o.lstrip("-").replace("-", "_") for o in getattr(param, "opts", ())}:
            raise EmbedtuneError(f"{where}: {key!r}: a config file can't name another config file")
        else:
            known = sorted(set(params) | set(fields))
            close = difflib.get_close_matches(norm, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(known)}"
            raise EmbedtuneError(f"{where}: unknown setting {key!r}{hint}")
        if target in set_by:
            raise EmbedtuneError(f"{where}: {key!r} sets the same option as {set_by[target]!r}")
        set_by[target] = key
        if value is None:
            if not _allows_none(hints.get(target)):
                raise EmbedtuneError(f"{where}: {key}: needs a value, got null")
            continue  # null: the command's own default, which is None
        defaults[target] = _check_value(where, key, value, hints.get(target, Any))
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_META_KEY] = file_fields


def _data_mapping(file: str, lines: dict[str, int], key: str, value: dict) -> dict:
    """`data:` as a mapping of data set name -> file, or -> {path: FILE, loss: NAME, columns: ...}; checked
    here so that a mistake names the config file's line."""
    for name, item in value.items():
        line = lines.get(f"{key}.{name}", lines.get(key))
        where = f"{file}:{line}" if line else file
        if isinstance(item, str):
            continue
        columns = item.get("columns") if isinstance(item, dict) else None
        if (not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "loss", "columns"}
                or not isinstance(item.get("loss", ""), str)
                or not (columns is None or isinstance(columns, str)
                        or (isinstance(columns, dict) and all(isinstance(v, (str, int)) for v in columns.values())))):
            raise EmbedtuneError(f"{where}: {key}: {name}: expected a file path or {{path: FILE, loss: NAME, "
                                 f"columns: {{ROLE: COLUMN, ...}}}} (loss and columns optional), got {_show(item)}")
    return value


def _value_target(norm: str, value) -> tuple[str, Any] | None:
    for (field, special), target in VALUE_TO_PARAM.items():
        if field == norm and type(value) is type(special) and value == special:
            return target
    return None


def apply_config_fields(ctx, config):
    """Apply the config file's fields that have no flag of their own to the dataclass ``config``.

    A field the command already moved off its dataclass default (from a flag) keeps the command's
    value: explicit flags win over the file.
    """
    file_fields = ctx.meta.get(_META_KEY) or {}
    if not file_fields:
        return config
    defaults = dataclass_defaults(type(config))
    changes = {k: v for k, v in file_fields.items() if getattr(config, k) == defaults.get(k, object())}
    return dataclasses.replace(config, **changes)


def dataclass_defaults(cls) -> dict[str, Any]:
    """Field name -> default value of a dataclass (fields without a default left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --------------------------------------------------------------------------------------------------
# Type checks: strict (2.5 is not a step count, "yes" is not a boolean), from the annotations


def _allows_none(hint) -> bool:
    if hint is None or hint is Any:
        return True
    return type(None) in typing.get_args(hint) if _is_union(hint) else False


def _is_union(hint) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def _describe(hint) -> str:
    if _is_union(hint):
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", Path: "a path",
             dict: "a mapping", list: "a list"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    if hint is Any or hint is None:
        return True
    if _is_union(hint):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or (isinstance(hint, type) and issubclass(hint, os.PathLike)):
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return any(value == m.value or value == m.name for m in hint)
    return True  # a type we don't know: the command's own parsing checks it


def _check_value(where: str, key: str, value, hint):
    """``value`` if it fits ``hint`` (a whole float such as 2.0 becomes 2 where only int fits), else an error."""
    if not _matches(value, hint):
        raise EmbedtuneError(f"{where}: {key}: expected {_describe(hint)}, got {_show(value)}")
    if isinstance(value, float) and value.is_integer() and not _matches(0.5, hint):
        return int(value)
    return value


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# Saving


def resolved_config(config, **resolved) -> dict[str, Any]:
    """The settings a run used, as plain YAML/JSON values: every dataclass field after defaults.

    ``resolved`` replaces fields whose default was decided during the run (the learning rate, the
    eval size). Local paths (data, output, a model folder) are written as `portable_path` gives them,
    never absolute: the file is shared with the run folder; ``NOT_SAVED`` switches and an empty
    ``extra`` are left out.
    """
    out = {}
    for f in dataclasses.fields(config):
        if f.name in NOT_SAVED:
            continue
        value = resolved.get(f.name, getattr(config, f.name))
        if f.name == "extra" and not value:
            continue
        if f.name in ("data", "output_dir", "model", "eval_data") and isinstance(value, (str, os.PathLike)):
            if f.name != "model" or Path(value).exists():
                value = portable_path(value)
        elif f.name == "data" and isinstance(value, list):  # several data files
            value = [portable_path(v) for v in value]
        elif f.name == "data" and isinstance(value, dict):  # name -> file or {path, loss}
            value = {k: portable_path(v) if isinstance(v, str) else {**v, "path": portable_path(v["path"])}
                     for k, v in value.items()}
        out[f.name] = json.loads(json.dumps(value, default=str))  # plain types only
    return out


def portable_path(value: str | os.PathLike) -> str:
    """A local path as a saved config names it: relative to the folder the run was started in when it
    lies inside it (a replay from there finds it), else only its file or folder name (a replay finds it
    in the folder it runs from, or takes it from the command line)."""
    path = Path(value).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return path.name


def write_config_yaml(settings: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``settings`` as YAML that `embedtune train --config` reads back."""
    import yaml

    path = Path(path)
    header = ("# embedtune train settings of this run; replay with: embedtune train --config config.yaml\n"
              "# (paths are relative to the folder the run was started in; files from elsewhere by their name)\n")
    path.write_text(header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
