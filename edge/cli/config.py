"""Configuration files for every command: ``--config FILE`` (TOML), options override the file.

A file holds one table per command, named as the command is typed (``[run]``, ``[serve]``, ``[fpga.build]``
for ``beamloop fpga build``), whose keys are the command's long option names with or without the leading
dashes and with ``-`` or ``_`` (``drift-A-per-s = 0.2`` or ``drift_A_per_s = 0.2``). Top-level keys that are
not tables are options of ``beamloop`` itself (``log-level``). Values are TOML strings, numbers, booleans
(for switches) or arrays (for options that take several values); a string goes through the option's own
parser, exactly as if typed. An unknown table or key, a value of the wrong kind or one outside the option's
choices is a one-line error naming the file, the table and the key. ``beamloop config show COMMAND
[OPTIONS]`` prints the settings a command would run with (defaults, then the file, then the options) as
TOML that ``--config`` reads back.

TOML: T. Preston-Werner et al., "TOML v1.0.0" (https://toml.io/en/v1.0.0), read with the standard library's
``tomllib`` (PEP 680).
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not fit the command's options."""


def config_path(argv: list[str]) -> str | None:
    """The FILE of the first ``--config FILE`` or ``--config=FILE`` in ``argv`` (None without one).

    Raises
    ------
    ConfigError
        ``--config`` as the last word, with no file after it.
    """
    for k, word in enumerate(argv):
        if word == "--":
            return None
        if word == "--config":
            if k + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            return argv[k + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def strip_config(argv: list[str]) -> list[str]:
    """``argv`` without its ``--config FILE`` words (the option is read before argparse sees the rest)."""
    out: list[str] = []
    skip = False
    for k, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--":
            out.extend(argv[k:])
            break
        if word == "--config":
            skip = True
            continue
        if word.startswith("--config="):
            continue
        out.append(word)
    return out


def load(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file at ``path``.

    Raises
    ------
    ConfigError
        The file is missing, unreadable or not valid TOML (the parser's line and column in the message).
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The long options of ``parser`` by their name without dashes, with ``_`` for ``-``."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        names = [s for s in action.option_strings if s.startswith("--")] or [action.dest]
        for s in names:
            out[s.lstrip("-").replace("-", "_")] = action
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """One TOML value as the option's parsed value (see the module docstring)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: a switch takes true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._StoreConstAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: a switch takes true or false, got {value!r}")
        return action.const if value else action.default
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 1
    if isinstance(action, argparse._AppendAction):
        many = True
    if many:
        items = value if isinstance(value, list) else [value]
        return [_one(action, v, where) for v in items]
    if isinstance(value, list):
        raise ConfigError(f"{where}: takes one value, got a list")
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: takes a value, not {str(value).lower()}")
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: takes a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: not a finite number: {value}")
    conv = action.type
    try:
        if conv is None:
            out = value if isinstance(value, str) else str(value)
        elif isinstance(value, str):
            out = conv(value)
        elif conv is int:
            out = _strict_int(value)
        elif conv is float:
            out = float(value)
        else:
            out = conv(str(value))  # the option's own parser reads the number as typed
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def _strict_int(value: float) -> int:
    if not float(value).is_integer():
        raise ValueError(f"expected an integer, got {value}")
    return int(value)


def apply(parser: argparse.ArgumentParser, config: dict[str, Any], source: str = "config") -> None:
    """Make the values of ``config`` (see the module docstring) the defaults of ``parser`` and its commands.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``beamloop`` parser with its subcommands registered.
    config : dict
        A parsed TOML document.
    source : str
        The file's name, for messages.

    Raises
    ------
    ConfigError
        An unknown command table or option key, or a value the option does not accept.
    """
    _apply(parser, config, source, "")


def _apply(parser: argparse.ArgumentParser, table: dict[str, Any], source: str, prefix: str) -> None:
    subs = _subparsers(parser)
    opts = _options(parser)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        name = key.lstrip("-").replace("-", "_")
        if isinstance(value, dict) and key in subs:
            _apply(subs[key], value, source, f"{prefix}{key}.")
            continue
        where = f"{source} [{prefix.rstrip('.') or 'beamloop'}] {key}"
        if name not in opts:
            known = sorted(subs) if isinstance(value, dict) else sorted(k.replace("_", "-") for k in opts)
            what = "command" if isinstance(value, dict) else "option"
            raise ConfigError(f"{where}: no such {what} (known: {', '.join(known)})")
        action = opts[name]
        defaults[action.dest] = _convert(action, value, where)
        action.required = False  # the file gives it
    if defaults:
        parser.set_defaults(**defaults)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, where it has one (not None, not a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if ("%(default)" in text or not action.option_strings or d is None or d is argparse.SUPPRESS
                or isinstance(d, bool) or text == argparse.SUPPRESS):
            return action.help
        shown = "x".join(map(str, d)) if isinstance(d, tuple) and all(isinstance(v, int) for v in d) else "%(default)s"
        return f"{text} (default: {shown})"


def show_defaults_in_help(parser: argparse.ArgumentParser) -> None:
    """Every command's ``--help`` lists each option's default (:class:`DefaultsHelpFormatter`)."""
    parser.formatter_class = DefaultsHelpFormatter
    for sub in _subparsers(parser).values():
        show_defaults_in_help(sub)


def effective(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command path and the settings ``beamloop WORDS`` would run with.

    Returns
    -------
    path : list of str
        The command as typed (e.g. ``["fpga", "build"]``).
    settings : dict
        Option name (with dashes) to value, in the order of the command's options.

    Raises
    ------
    ConfigError
        ``WORDS`` do not name a command.
    SystemExit
        argparse rejected the options (it printed why).
    """
    path: list[str] = []
    p = parser
    for w in words:
        subs = _subparsers(p)
        if w in subs:
            path.append(w)
            p = subs[w]
        else:
            break
    if not path or _subparsers(p):
        raise ConfigError(f"config show needs a command, e.g. 'config show run' (got {' '.join(words) or 'none'})")
    ns = parser.parse_args(words)
    settings: dict[str, Any] = {}
    for action in p._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        long = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        settings[long.lstrip("-")] = getattr(ns, action.dest, None)
    return path, settings


def to_toml(path: list[str], settings: dict[str, Any]) -> str:
    """``settings`` as a TOML table ``[path]`` (unset options as comments: TOML has no null)."""
    lines = [f"[{'.'.join(path)}]"]
    for key, value in settings.items():
        text = _toml_value(value)
        lines.append(f"{key} = {text}" if text is not None else f"# {key} = (not set)")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return repr(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and len(value) == 2:
            return _quote(f"{value[0]}x{value[1]}")  # a shape ROWSxCOLS, as typed
        parts = [_toml_value(v) for v in value]
        return "[" + ", ".join(p if p is not None else '""' for p in parts) + "]"
    return _quote(str(value))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_config_show(a: argparse.Namespace) -> int:
    """``beamloop config show COMMAND [OPTIONS]``: print the effective settings as TOML; exit status."""
    from beamloop.edge.cli import build_parser, error

    parser = build_parser()
    if a.config_file:
        apply(parser, load(a.config_file), a.config_file)
    try:
        path, settings = effective(parser, list(a.words))
    except ConfigError as exc:
        error("config", str(exc))
        return 1
    sys.stdout.write(to_toml(path, settings))
    return 0


def register(sub) -> None:
    """Add ``config`` (``config show``) to the ``beamloop`` subcommands."""
    c = sub.add_parser("config", help="configuration files: show the settings a command would run with")
    csub = c.add_subparsers(dest="config_command", required=True)
    s = csub.add_parser("show", help="print the effective settings of a command (defaults, --config file, "
                                     "options) as TOML")
    s.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND [OPTIONS]",
                   help="the command and options to evaluate, e.g. 'run --rounds 5'")
    s.set_defaults(func=cmd_config_show, config_file=None)
