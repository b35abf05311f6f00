"""Configs from files, and the field reference of ``sparse-jax train --help-config``.

* ``load_config(spec)``: a preset name (``tiny``, ``0.5b``, ...) or a JSON/YAML file (``.json``,
  ``.yaml``/``.yml``; YAML needs PyYAML). A file holds sections as in a run's ``config.json``
  (which loads as it is, so ``--config runs/x/config.json`` repeats run x), any subset of them::

      preset: 0.5b          # optional: start from this preset (default: the dataclass defaults)
      name: my-run          # optional (default: the file name without extension)
      model: {n_layers: 4}
      train: {lr: 3.0e-4, steps: 5000}

  Values are checked against the field types (strings are parsed as ``--set`` parses them, so
  YAML's ``lr: 3e-4``, which YAML reads as a string, works) and by the config's own validation;
  an unknown section or field is an error naming it. ``--set`` overrides apply on top.
* ``field_reference()``: every field of every section with its type, default and meaning. The
  meaning is the field's entry in its section class's docstring (``name: text`` lines, one
  source of truth); ``undocumented_fields()`` lists fields without one (a test keeps it empty).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import types
import typing
from typing import Any

from sparse_jax.config import PRESETS, Config, _parse_value, get_config

_ENTRY = re.compile(r"^([a-z_][a-z0-9_]*(?:\s*[/,]\s*[a-z_][a-z0-9_]*)*): (.*)$")
_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def load_config(spec: str) -> Config:
  """The preset ``spec`` or the config of the JSON/YAML file ``spec``."""
  if spec in PRESETS:
    return get_config(spec)
  if not (os.path.isfile(spec) or spec.endswith(_FILE_SUFFIXES)):
    raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                     "JSON/YAML file")
  return config_from_mapping(read_mapping(spec), where=spec,
                             default_name=os.path.splitext(os.path.basename(spec))[0])


def read_mapping(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path!r}: no such file")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith((".yaml", ".yml")):
    try:
      import yaml
    except ImportError:
      raise ImportError(f"--config {path!r}: reading YAML needs PyYAML: pip install pyyaml "
                        "(or write the config as JSON)") from None
    try:
      data = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise ValueError(f"--config {path!r}: not valid YAML ({e})") from None
  else:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"--config {path!r}: not valid JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(data, dict):
    raise ValueError(f"--config {path!r}: expected a mapping of sections (model, data, train, "
                     "parallel), got " + type(data).__name__)
  return data


def _value(v: Any, typ: Any, where: str) -> Any:
  """``v`` as a value of the annotated type ``typ`` (strings parsed as --set parses them)."""
  if isinstance(v, str) and typ is not str:
    return _parse_value(v, typ, where)
  options = typing.get_args(typ) if (isinstance(typ, types.UnionType)
                                     or typing.get_origin(typ) is typing.Union) else (typ,)
  if v is None and type(None) in options:
    return None
  for t in options:
    if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
      return float(v)
    if t is int and isinstance(v, int) and not isinstance(v, bool):
      return v
    if t is int and isinstance(v, float) and v.is_integer():
      return int(v)
    if t in (bool, str) and isinstance(v, t):
      return v
    if typing.get_origin(t) is tuple and isinstance(v, (list, tuple)):  # JSON/YAML lists
      (item, *_) = typing.get_args(t) or (Any,)
      return tuple(_value(x, item, where) for x in v)
  raise ValueError(f"{where}={v!r}: expected {_type_name(typ)}")


def _build(base: Any, mapping: dict, where: str) -> Any:
  """``base`` (a config dataclass) with the fields of ``mapping`` replaced, nested sections too."""
  hints = typing.get_type_hints(type(base))
  changes = {}
  for key, v in mapping.items():
    if key not in hints:
      raise ValueError(f"{where}: no field {key!r}; fields: {', '.join(hints)}")
    current = getattr(base, key)
    if dataclasses.is_dataclass(current) and isinstance(v, dict):
      changes[key] = _build(current, v, f"{where}.{key}")
    else:
      changes[key] = _value(v, hints[key], f"{where}.{key}")
  return dataclasses.replace(base, **changes)


def _renamed(data: dict) -> dict:
  """``data`` with keys that ``sparse_jax.config.RENAMED_KEYS`` maps ({"a.b": "a.c.d"}) moved to
  their new place, so an older run's config.json still loads (a new key given too wins)."""
  import copy

  from sparse_jax import config as config_module
  data = copy.deepcopy(data)
  for old, new in getattr(config_module, "RENAMED_KEYS", {}).items():
    *old_path, old_key = old.split(".")
    node = data
    for part in old_path:
      node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old_key not in node:
      continue
    value = node.pop(old_key)
    *new_path, new_key = new.split(".")
    node = data
    for part in new_path:
      node = node.setdefault(part, {})
    node.setdefault(new_key, value)
  return data


def config_from_mapping(data: dict, *, where: str = "config", default_name: str = "") -> Config:
  data = _renamed(data)
  preset = data.pop("preset", None)
  base = get_config(preset) if preset is not None else Config()
  sections = {f.name for f in dataclasses.fields(Config)} - {"name"}
  unknown = set(data) - sections - {"name"}
  if unknown:
    raise ValueError(f"--config {where!r}: unknown section(s) {', '.join(sorted(unknown))}; the "
                     f"sections are {', '.join(sorted(sections))} (and name, preset)")
  name = data.pop("name", None) or (preset if preset and not default_name else default_name)
  changes = {}
  for section, values in data.items():
    if not isinstance(values, dict):
      raise ValueError(f"--config {where!r}: section {section!r} must be a mapping of fields")
    changes[section] = _build(getattr(base, section), values, section)
  return dataclasses.replace(base, name=name or base.name, **changes)


# --------------------------------------------------------------------------- field reference


def _type_name(typ: Any) -> str:
  if isinstance(typ, type):
    return typ.__name__
  return str(typ).replace("typing.", "").replace("NoneType", "None")


def docstring_entries(cls) -> dict[str, str]:
  """{field: meaning} from ``name: text`` (or ``a / b: text``) lines of ``cls``'s docstring;
  indented lines continue an entry."""
  out: dict[str, str] = {}
  names: list[str] = []
  text: list[str] = []

  def flush():
    for n in names:
      out.setdefault(n, " ".join(text))

  for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
    m = _ENTRY.match(line)
    if m:
      flush()
      names = [n.strip() for n in re.split(r"[/,]", m.group(1))]
      text = [m.group(2).strip()]
    elif names and line.startswith(" ") and line.strip():
      text.append(line.strip())
    else:
      flush()
      names, text = [], []
  flush()
  return out


def _sections(cfg: Config):
  """(prefix, config object) of every section, nested sections included."""
  todo = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "name"]
  while todo:
    prefix, obj = todo.pop(0)
    yield prefix, obj
    todo += [(f"{prefix}.{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)
             if dataclasses.is_dataclass(getattr(obj, f.name))]


def field_rows(cfg: Config | None = None) -> list[dict]:
  """One row per field: key, type, default (of ``cfg``, default the dataclass defaults), meaning
  (None where the docstring has no entry)."""
  rows = []
  for prefix, obj in _sections(cfg or Config()):
    meanings = docstring_entries(type(obj))
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
      value = getattr(obj, f.name)
      if dataclasses.is_dataclass(value):
        continue
      rows.append(dict(key=f"{prefix}.{f.name}", type=_type_name(hints[f.name]),
                       default=value, meaning=meanings.get(f.name)))
  return rows


def undocumented_fields() -> list[str]:
  return [r["key"] for r in field_rows() if not r["meaning"]]


def field_reference(cfg: Config | None = None, width: int = 100) -> str:
  """The text of ``--help-config``: fields by section, with type, default and meaning."""
  import textwrap
  lines = ["Config fields (set with --set SECTION.FIELD=VALUE or in a --config JSON/YAML file)"
           + (f"; defaults of --config {cfg.name}" if cfg is not None else "") + ":"]
  section = None
  for r in field_rows(cfg):
    s = r["key"].rsplit(".", 1)[0]
    if s != section:
      section = s
      lines += ["", f"[{s}]"]
    lines.append(f"  {r['key']} ({r['type']}, default {json.dumps(r['default'])})")
    lines += textwrap.wrap(r["meaning"] or "(undocumented)", width, initial_indent=" " * 6,
                           subsequent_indent=" " * 6)
  return "\n".join(lines)
