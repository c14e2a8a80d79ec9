"""Server settings from a TOML file, the environment and flags, in that rising order of precedence.

Generic over the settings dataclass: every field of ServerConfig (and of nested
dataclasses such as its `engine` section) is a setting, with no list to keep in
step. A field `port` is `port = 50051` in the file, BLOBSTORE_PORT in the
environment and `--set port=50051` on the command line; a nested field
`engine.chunk_size` is `[engine] chunk_size = ...`, BLOBSTORE_ENGINE_CHUNK_SIZE
and `--set engine.chunk_size=...`. Text from the environment or a flag is read
as a TOML value (so `8`, `1.5`, `true` and `["a", "b"]` mean what they say),
except for string settings, which take the text as it is.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

ENV_PREFIX = "BLOBSTORE_"

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting that does not exist or has a value of the wrong type; names the source."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf field of the settings tree."""

    path: tuple[str, ...]
    type: Any
    default: Any

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + "_".join(self.path).upper()


def settings(cls: type[Any], prefix: tuple[str, ...] = ()) -> Iterator[Setting]:
    """Every leaf setting of a dataclass, nested dataclasses flattened into dotted paths."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from settings(kind, (*prefix, f.name))  # type: ignore[arg-type]
        else:
            yield Setting((*prefix, f.name), kind, getattr(defaults, f.name))


def load_config(
    cls: type[C],
    *,
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Builds `cls` from defaults < the TOML `file` < `env` (BLOBSTORE_*) < `overrides`.

    `overrides` maps dotted names to values (typed, or text read like the
    environment's); None values are ignored, so unset flags can be passed as they are.
    """
    known = {s.name: s for s in settings(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        with open(file, "rb") as fobj:
            try:
                document = tomllib.load(fobj)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        for name, value in _flatten(document):
            setting = _lookup(known, name, f"{file}")
            values[name] = _check(setting, value, f"{file}: {name}")
    for setting in known.values():
        text = (env or {}).get(setting.env_name)
        if text is not None:
            values[setting.name] = _parse(setting, text, f"${setting.env_name}")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        setting = _lookup(known, name, "flag")
        source = f"setting {name}"
        values[name] = _parse(setting, value, source) if isinstance(value, str) else _check(setting, value, source)
    return _build(cls, (), values)


def parse_assignments(assignments: list[str] | tuple[str, ...]) -> dict[str, str]:
    """NAME=VALUE pairs, as `--set` takes them."""
    parsed = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set takes NAME=VALUE, not {assignment!r}")
        parsed[name.strip()] = value.strip()
    return parsed


def _flatten(document: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in document.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _lookup(known: Mapping[str, Setting], name: str, source: str) -> Setting:
    try:
        return known[name]
    except KeyError:
        raise ConfigError(f"{source}: unknown setting {name!r}; see docs/configuration.md") from None


def _parse(setting: Setting, text: str, source: str) -> Any:
    if _matches(setting.type, text):  # a string setting, or one of a Literal's strings
        return text
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{source}: {text!r} is not a {_describe(setting.type)}") from None
    return _check(setting, value, source)


def _check(setting: Setting, value: Any, source: str) -> Any:
    kind = setting.type
    value = _coerce(kind, value)
    if not _matches(kind, value):
        raise ConfigError(f"{source}: {value!r} is not a {_describe(kind)}")
    return value


def _coerce(kind: Any, value: Any) -> Any:
    """What TOML cannot say directly: ints for floats, arrays for tuples, text for bytes (UTF-8)."""
    for option in _options(kind):
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is bytes and isinstance(value, str):
            return value.encode()
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            items = [arg for arg in typing.get_args(option) if arg is not Ellipsis]
            return origin(_coerce(items[0], item) for item in value) if items else origin(value)
    return value


def _options(kind: Any) -> tuple[Any, ...]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _accepts(kind: Any, simple: type) -> bool:
    return simple in _options(kind)


def _matches(kind: Any, value: Any) -> bool:
    for option in _options(kind):
        origin = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return True
        elif origin is typing.Literal:
            if value in typing.get_args(option):
                return True
        elif origin in (int, float) and isinstance(value, bool):
            continue
        elif origin in (list, tuple) and isinstance(value, origin):
            items = [arg for arg in typing.get_args(option) if arg is not Ellipsis]
            if not items or all(_matches(items[0], item) for item in value):
                return True
        elif isinstance(origin, type) and isinstance(value, origin):
            return True
    return False


def _describe(kind: Any) -> str:
    names = []
    for option in _options(kind):
        if typing.get_origin(option) is typing.Literal:
            names.append("one of " + ", ".join(map(repr, typing.get_args(option))))
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _build(cls: type[C], prefix: tuple[str, ...], values: Mapping[str, Any]) -> C:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = _build(kind, path, values)  # type: ignore[arg-type]
        elif ".".join(path) in values:
            kwargs[f.name] = values[".".join(path)]
    return cls(**kwargs)
