"""``--config FILE``: settings from a TOML file, checked against the one settings table.

Each key is a flag's name with ``_`` for ``-`` (``allow_port = ["443", "8000-8100"]``), each
value what the flag takes: a string or a number, or a list of them for a repeatable flag
(one value is a list of one). Flags given on the command line override the file, a
repeatable one replacing the file's whole list. There is no second table: keys, parsing and
messages come from the fields of :class:`~splicegate.config.Config`, so a new setting is a
key the day it is a flag. A wrong key or value is refused with the file, the key, the value
and what is allowed, at start, for ``splicegate check-config`` and on reload alike.
"""

from __future__ import annotations

import datetime
import difflib
import json
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import Field
from typing import Any

from splicegate import accesslog
from splicegate.config import Config, cli_fields, not_utf8
from splicegate.files import read_regular
from splicegate.request import show_address


class ConfigError(ValueError):
    """Settings that cannot be used, with a message that names the file or the flag."""


def read_file(path: str) -> dict[str, Any]:
    """The file's settings by field name, each value checked by the field's parser (the
    values are returned as written; :class:`Config` coerces them)."""
    try:
        data = tomllib.loads(read_regular(path).decode())
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except UnicodeDecodeError as exc:
        # The whole file is decoded before any of it is parsed, so this is no
        # TOMLDecodeError, and its own text does not say which file.
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{path}: not valid TOML: a TOML file is UTF-8, and byte 0x{byte:02x} at offset "
            f"{exc.start} is not ({exc.reason})"
        ) from None
    settings = {f.name: f for f in cli_fields()}
    for key, value in data.items():
        f = settings.get(key)
        if f is None:
            raise ConfigError(f"{path}: {_unknown(key, list(settings))}")
        _check(path, key, f, value)
    return data


def _unknown(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key!r}{hint}; the keys are the flags' names with _ for -: " + ", ".join(
        names
    )


def _check(path: str, key: str, f: Field[Any], value: Any) -> None:
    shown = f"{key} = {_toml(value)}"
    expected = f.metadata["metavar"] or "a value"
    if f.metadata["multiple"]:
        items = value if isinstance(value, list) else [value]
    elif isinstance(value, list):
        raise ConfigError(f"{path}: {shown}: takes one value ({expected}), not a list")
    else:
        items = [value]
    for item in items:
        # TOML has types the command line has not; refuse them rather than let str() or
        # float() make sense of them (true would become 1.0 seconds).
        if isinstance(item, bool | dict | list | datetime.date | datetime.time):
            kind = {bool: "true/false", dict: "a table", list: "a nested list"}.get(
                type(item), "a date or time"
            )
            raise ConfigError(f"{path}: {shown}: {kind} is not allowed; expected {expected}")
        try:
            f.metadata["parse"](item)
        except ValueError as exc:
            raise ConfigError(f"{path}: {shown}: {exc}") from None


def load(path: str | None, flags: Mapping[str, Any] | None = None) -> Config:
    """The effective settings: defaults, then the file, then the flags given (None: not
    given). Raises ConfigError naming the file's key or the flag at fault."""
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    merged = {**(read_file(path) if path else {}), **given}
    try:
        return Config(**merged)
    except ValueError as exc:
        # Config names the setting first ("allow-port: ..."): say where it came from.
        name = str(exc).partition(":")[0]
        if name.replace("-", "_") in given or not path:
            raise ConfigError(f"--{exc}") from None
        raise ConfigError(f"{path}: {exc}") from None


def check_files(config: Config, running: Config | None = None) -> None:
    """Raise ConfigError when the settings name an access log that cannot be opened, as
    starting on them would (Config itself reads the password file): what ``check-config``
    says, and what a supervisor judges a reload by, once for all its workers. Against the
    ``running`` settings, the same log (path and format) is not judged: it is open, and a
    reload keeps it, as ``accesslog.reuse_or_open`` does."""
    if running is not None and (running.access_log, running.log_format) == (
        config.access_log,
        config.log_format,
    ):
        return
    try:
        accesslog.check_can_open(config.access_log)
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc)) from None


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings that differ but that a running proxy cannot change (``restart=True``)."""
    return [
        f.name
        for f in cli_fields()
        if f.metadata.get("restart") and getattr(old, f.name) != getattr(new, f.name)
    ]


def _show(item: Any) -> Any:
    """A parsed value as the command line and the file write it."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int):
        return show_address(item)
    if isinstance(item, int | float | str):
        return item
    return str(item)


def _toml(value: Any, nested: bool = False) -> str:
    """A value as TOML writes it; in a list, a list or table as ``[…]`` or ``{…}``: a
    setting holds no such thing, and the message that says so must not recurse as deep
    as the file did (a few hundred levels pass tomllib, and would exhaust the stack)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[\u2026]" if nested else "[" + ", ".join(_toml(v, True) for v in value) + "]"
    if isinstance(value, dict):
        return "{\u2026}"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but TOML wants the characters past
    U+FFFF as themselves (JSON's surrogate pairs are refused), and DEL escaped. A lone
    surrogate (a command-line argument that was not UTF-8) has no TOML form at all."""
    if not_utf8(text):
        raise ValueError(f"{text!r} is not UTF-8, and a TOML file holds only UTF-8")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def render(config: Config, replaced: Mapping[str, Any] | None = None) -> str:
    """The settings as a TOML file that loads back to the same settings, every key written,
    defaults described in a comment where the value alone does not say (an empty list).
    ``replaced``: values written instead of the config's (a supervisor's for its workers:
    a file that is not there yet, as a Config would read it)."""
    lines = []
    for f in cli_fields():
        value = (replaced or {}).get(f.name, getattr(config, f.name))
        try:
            if f.metadata["multiple"]:
                text = _toml([_show(v) for v in value])
            else:
                text = _toml("" if value is None else _show(value))
        except ValueError as exc:
            raise ConfigError(f"{f.name}: {exc}") from None
        described = f.metadata["shown_default"]
        if described and (value in ((), None, "") or text in ("0", "0.0")):
            text += f"  # {described}"
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"


def check_config_main(argv: list[str]) -> int:
    """``splicegate check-config FILE [FLAGS]``: check the file (under any flags given, as
    the daemon would read them), and the password file and access log it names, and print
    the effective settings as TOML; exit 0 when they are good, 2 with the reason when not."""
    from splicegate.cli import build_parser, flag_values

    parser = build_parser()
    parser.prog = "splicegate check-config"
    parser.usage = "splicegate check-config FILE [FLAGS]"
    parser.add_argument("file", metavar="FILE", help="the TOML file to check")
    args = parser.parse_args(argv)
    try:
        config = load(args.file, flag_values(args))
        check_files(config)
        text = render(config)
    except ConfigError as exc:
        print(f"splicegate check-config: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(f"# the effective settings of {args.file}, all valid\n" + text)
    return 0
