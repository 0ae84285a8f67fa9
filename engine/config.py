"""Load a typed config: dataclass defaults < YAML file < command-line `key=value` overrides.

Built on OmegaConf's structured configs (type checking, `${model.output_dim}` interpolation), with
our own key checks in front so that a wrong key names itself and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("engine")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def schema_keys(schema_cls) -> list[str]:
    """Every dotted leaf key of a dataclass schema, e.g. 'model.vision.hidden_size'."""
    keys = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            field_type = _field_dataclass(cls, f)
            if field_type is not None:
                walk(field_type, path + ".")
            else:
                keys.append(path)

    walk(schema_cls, "")
    return keys


def _field_dataclass(cls, f):
    """The dataclass type of a field, or None for a leaf (resolves string annotations)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return type(value)
    return None


def _check_key(key: str, valid: list[str], source: str) -> None:
    if key in valid:
        return
    # A section name alone (model.vision) cannot take a scalar; a prefix of a leaf is a section.
    if any(v.startswith(key + ".") for v in valid):
        raise ConfigError(f"{source}: '{key}' is a section, not a value; set one of its keys, e.g. "
                          f"'{next(v for v in valid if v.startswith(key + '.'))}'")
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # try the last component against last components (a typo in a deep key)
        leaf = key.rsplit(".", 1)[-1]
        close = [v for v in valid if v.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [x.rsplit(".", 1)[-1] for x in valid], n=3, cutoff=0.7)][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                flat[path] = value
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def parse_overrides(args: Sequence[str], bare_keys: dict[str, str],
                    aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """`key=value` strings -> {dotted_key: value}, values parsed as YAML scalars/lists. Bare keys and
    aliases are mapped to their dotted keys; a key given twice is an error showing both values (an
    unquoted brace pattern that the shell expanded into several words looks like that)."""
    out, given = {}, {}
    for arg in args:
        if "=" not in arg:
            hint = ""
            if given:
                last = list(given.values())[-1]
                hint = (f" (after '{last}': an unquoted brace or glob pattern that the shell expanded into "
                        "several words? quote the value)")
            raise ConfigError(f"override '{arg}' is not of the form key=value{hint}")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("+")
        key = bare_keys.get(key, key)
        key = _resolve_alias(key, aliases)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{arg}': cannot parse value: {exc}") from exc
        if key in given and out[key] != value:
            raise ConfigError(f"'{key}' is given twice on the command line: '{given[key]}' and '{arg}' (an "
                              "unquoted brace pattern the shell expanded? quote it); give it once")
        given[key] = arg
        out[key] = value
    return out


_announced_aliases: set[str] = set()


def _resolve_alias(key: str, aliases: dict[str, str] | None) -> str:
    """Another tool's documented path for a key (NeMo's `model.tensor_model_parallel_size`, say)
    -> this engine's key, logged once per alias."""
    if not aliases or key not in aliases:
        return key
    target = aliases[key]
    if key not in _announced_aliases:
        _announced_aliases.add(key)
        log.info("config key '%s' is read as '%s'", key, target)
    return target


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_config(schema_cls, config_file: str | None = None, overrides: Sequence[str] = (),
                bare_keys: dict[str, str] | None = None, aliases: dict[str, str] | None = None):
    """Build the dataclass instance `schema_cls` from defaults, an optional YAML file and overrides.
    `bare_keys` (`tensor_model_parallel_size`) and `aliases` (other tools' paths) name dotted keys."""
    bare_keys = bare_keys or {}
    valid = schema_keys(schema_cls)
    base = OmegaConf.structured(schema_cls)
    layers = []
    if config_file:
        try:
            with open(config_file) as fh:
                file_tree = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from exc
        if not isinstance(file_tree, dict):
            raise ConfigError(f"config file {config_file}: top level must be a mapping of sections")
        # Bare parallel keys are accepted at the top of a file too.
        for bare, dotted in bare_keys.items():
            if bare in file_tree:
                section, leaf = dotted.split(".", 1)
                file_tree.setdefault(section, {})[leaf] = file_tree.pop(bare)
        flat = _flatten(file_tree)
        if aliases and any(k in aliases for k in flat):
            file_tree = _unflatten({_resolve_alias(k, aliases): v for k, v in flat.items()})
            flat = _flatten(file_tree)
        for key in flat:
            _check_key(key, valid, config_file)
        layers.append(OmegaConf.create(file_tree))
    cli = parse_overrides(overrides, bare_keys, aliases)
    for key in cli:
        _check_key(key, valid, "command line")
    if cli:
        layers.append(OmegaConf.from_dotlist([f"{k}={_dotlist_value(v)}" for k, v in cli.items()]))
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config value: {exc}") from exc
    from engine.config_checks import check_config

    problems = check_config(cfg)
    if problems:
        raise ConfigError("invalid config values:\n  " + "\n  ".join(problems) if len(problems) > 1
                          else f"invalid config value: {problems[0]}")
    return cfg


def _dotlist_value(value: Any) -> str:
    """Back to text OmegaConf's dotlist parser reads the same way (lists, None, strings)."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value) if not isinstance(value, str) else value


def to_yaml(cfg) -> str:
    """The resolved config as YAML (written next to outputs and into checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take `--config PATH` / `--config=PATH` out of argv; the rest are overrides."""
    config_file, rest, it = None, [], iter(argv)
    for arg in it:
        if arg == "--config":
            config_file = next(it, None)
            if config_file is None:
                raise ConfigError("--config needs a path")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_file, rest


def sync_config_file(path: str, schema_cls) -> None:
    """Rewrite a YAML config so it lists every schema key (new keys get their defaults), keeping
    its values, its `${...}` interpolations and its leading comment block."""
    with open(path) as fh:
        lines = fh.read().splitlines(keepends=True)
    header = "".join(line for line in lines[: next((i for i, text in enumerate(lines) if not text.startswith("#")), len(lines))])
    merged = OmegaConf.merge(OmegaConf.structured(schema_cls), OmegaConf.load(path))
    with open(path, "w") as fh:
        fh.write(header + OmegaConf.to_yaml(merged))


if __name__ == "__main__":  # python -m engine.config clip configs/clip/*.yaml
    import sys

    from engine.family import get_family

    schema = get_family(sys.argv[1]).config_cls
    for config_path in sys.argv[2:]:
        sync_config_file(config_path, schema)
        print(f"synced {config_path}")
