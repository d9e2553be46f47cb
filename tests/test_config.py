"""Configuration files (edge/cli/config.py): --config TOML per command, options override, config show."""

import logging

import numpy as np
import pytest

from beamloop.edge.cli import EXIT_USAGE, build_parser, main
from beamloop.edge.cli.config import ConfigError, apply, effective, to_toml


def parse(words, toml_text=None, tmp_path=None):
    parser = build_parser()
    if toml_text is not None:
        import tomllib
        apply(parser, tomllib.loads(toml_text), "test.toml")
    return parser.parse_args(words)


def test_file_sets_defaults_and_options_override():
    a = parse(["run", "--seed", "7"], '[run]\nrounds = 5\nseed = 2\nshape = "128x96"\ndrift-A-per-s = 0.2\n'
                                      'quiet = true\ntrigger-at = "service"\n')
    assert a.rounds == 5 and a.seed == 7 and a.shape == (128, 96) and a.drift_A_per_s == 0.2
    assert a.quiet is True and a.trigger_at == "service"
    b = parse(["run"])
    assert b.rounds == 3 and b.shape == (256, 256) and b.quiet is False


def test_underscores_dashes_and_nested_command_tables():
    a = parse(["run"], "[run]\ndrift_A_per_s = 1.0\n--max-dwell = 0.5\n")
    assert a.drift_A_per_s == 1.0 and a.max_dwell == 0.5
    a = parse(["--log-level", "info", "run"], 'log-level = "DEBUG"\n')
    assert a.log_level == "INFO"
    assert parse(["run"], 'log-level = "debug"\n').log_level == "DEBUG"


@pytest.mark.parametrize("text, words", [
    ("[run]\nnot-an-option = 1\n", "no such option"),
    ("[nosuchcommand]\nx = 1\n", "no such command"),
    ("[run]\nrounds = 2.5\n", "whole number"),
    ("[run]\nrounds = true\n", "takes a value"),
    ("[run]\nquiet = 1\n", "a switch takes true or false"),
    ('[run]\ntrigger = "bogus"\n', "is not one of"),
    ('[run]\nshape = "big"\n', "big"),
    ("[run]\nseed = [1, 2]\n", "takes one value"),
    ("[run]\ndose = nan\n", "not a finite number"),
])
def test_bad_values_name_file_table_and_key(text, words):
    import tomllib
    with pytest.raises(ConfigError) as exc:
        apply(build_parser(), tomllib.loads(text), "my.toml")
    msg = str(exc.value)
    assert "my.toml" in msg and words in msg and "\n" not in msg


def test_main_reports_bad_file_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "config", "show", "run"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and err[0].startswith("beamloop config: error:")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 1\n")
    assert main([f"--config={bad}", "run"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid TOML" in err[0]


def test_config_show_round_trips_through_config(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nrounds = 6\nshape = "64x80"\n[find]\npixel-size = 0.2\n')
    assert main(["--config", str(cfg), "config", "show", "run", "--targets", "2"]) == 0
    shown = capsys.readouterr().out
    assert "rounds = 6" in shown and 'shape = "64x80"' in shown and "targets = 2" in shown
    again = tmp_path / "shown.toml"
    again.write_text(shown)
    parser = build_parser()
    import tomllib
    apply(parser, tomllib.loads(shown), str(again))
    path, settings = effective(parser, ["run"])
    assert path == ["run"] and settings["rounds"] == 6 and settings["shape"] == (64, 80)
    assert settings["targets"] == 2
    assert to_toml(path, settings) == shown


def test_config_show_needs_a_command(capsys):
    assert main(["config", "show"]) == 1
    assert "needs a command" in capsys.readouterr().err


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in out and "(default: 0.15)" in out and "(default: 256x256)" in out


def test_config_drives_a_real_command(tmp_path, capsys):
    # find on an image whose pixel size and output folder come from the file
    import beamloop
    frame = beamloop.simulated_frame(shape=(96, 96), pixel_size_A=0.15, seed=4)
    img = tmp_path / "frame.npy"
    np.save(img, frame.counts)
    out = tmp_path / "found"
    cfg = tmp_path / "find.toml"
    parser = build_parser()
    find = [a for a in parser._subparsers._group_actions[0].choices["find"]._actions if a.option_strings]
    names = {s for a in find for s in a.option_strings}
    lines = ["[find]"]
    if "--pixel-size" in names:
        lines.append("pixel-size = 0.15")
    if "--out" in names:
        lines.append(f'out = "{out}"')
    if "--material" in names:
        lines.append('material = "MoS2"')
    cfg.write_text("\n".join(lines) + "\n")
    assert main(["--config", str(cfg), "find", str(img)]) == 0
    written = list(out.glob("*columns*.csv"))
    assert written, list(out.iterdir()) if out.exists() else "no output folder"
    import csv
    rows = list(csv.DictReader(written[0].open()))
    # the file's pixel size reached find: positions in Angstrom, and the MoS2 classes
    assert rows and all(abs(float(r["x_A"]) - 0.15 * float(r["x_px"])) < 2e-3 for r in rows)
    assert {r["class"] for r in rows} <= {"Mo", "S2", "S1", "vacancy"}
    truth = frame.truth_xy
    inside = ((truth[:, 0] > 2) & (truth[:, 0] < 93) & (truth[:, 1] > 2) & (truth[:, 1] < 93)).sum()
    assert abs(len([r for r in rows if r["class"] != "vacancy"]) - inside) <= 0.1 * inside


def test_log_level_sets_the_beamloop_logger(capsys):
    assert main(["--log-level", "DEBUG", "config", "show", "run"]) == 0
    assert logging.getLogger("beamloop").level == logging.DEBUG
    assert main(["config", "show", "run"]) == 0
    assert logging.getLogger("beamloop").level == logging.WARNING


def test_a_missing_extra_is_one_line_naming_the_extra(monkeypatch, capsys):
    import argparse

    import beamloop.edge.cli as cli

    def needs_torch(a: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    parser = build_parser()
    real = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda words: argparse.Namespace(**{**vars(real(words)),
                                                                                  "func": needs_torch}))
    assert main(["config", "show", "run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["beamloop config: error: needs the optional package 'torch': install it with "
                   "pip install 'beamloop[train]'"]
    assert cli.missing_extra_message("gpytorch.models").endswith("'beamloop[dkl]'")
    assert "not installed" in cli.missing_extra_message("nosuchpackage")


def test_durations_and_frequencies_carry_their_unit_in_the_name():
    import argparse
    import re

    from beamloop.edge.cli.config import _subparsers

    timed = re.compile(r"(timeout|duration|dwell(?!s)|wait|park|watchdog|freq|interval|heartbeat|settle|sample-time)")
    unit = re.compile(r"-(s|ms|us|ns|mhz|hz|min|samples)$")
    bad = []

    def walk(p, path):
        for a in p._actions:
            longs = [s for s in a.option_strings if s.startswith("--")]
            if not longs or isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue
            if any(timed.search(s) for s in longs) and not any(unit.search(s) for s in longs):
                if a.type not in (str, None) or a.default is not None and not isinstance(a.default, str):
                    bad.append(f"{' '.join(path)} {longs[0]}")
        for k, v in _subparsers(p).items():
            walk(v, [*path, k])

    walk(build_parser(), ["beamloop"])
    assert not bad, "; ".join(bad)


def test_one_word_for_quiet_and_compression():
    p = build_parser()
    for words in (["run", "--quiet"], ["find", "x", "--out", "o", "--quiet"], ["bench", "--quiet"]):
        ns = p.parse_args(words)
        assert getattr(ns, "quiet", None) is True or getattr(ns, "no_progress", None) is True
    assert p.parse_args(["sim", "--compression", "none"]).encoding == "raw"
    assert p.parse_args(["replay", "x", "--to", "tcp://127.0.0.1:1", "--compression", "lz4"]).encoding == "lz4"
    with pytest.raises(SystemExit):
        p.parse_args(["sim", "--compression", "zstd"])


def test_drift_correction_options_reach_the_service_config():
    from beamloop.edge.app import build_path
    from beamloop.edge.cli.serve import service_config

    p = build_parser()
    a = p.parse_args(["serve", "--frames", "tcp://127.0.0.1:1", "--bridge", "tcp://127.0.0.1:2", "--experiment",
                      "vacancy-line", "--lock-on", "rescan", "--match-columns", "--rescan-updates",
                      "--recentre-s", "1.5", "--recentre-decline", "0.8"])
    cfg = service_config(a)
    assert (cfg.match_columns, cfg.rescan_updates, cfg.recentre_s, cfg.recentre_decline) == (True, True, 1.5, 0.8)
    reg = [s for s in build_path(cfg).stages if s.name == "register"]
    assert reg and reg[0].match_columns
    off = service_config(p.parse_args(["serve", "--frames", "tcp://127.0.0.1:1"]))
    assert (off.match_columns, off.rescan_updates, off.recentre_s, off.recentre_decline) == (False, False, None, None)
    r = p.parse_args(["run", "--recentre-s", "2", "--lock-on", "rescan"])
    assert r.recentre_s == 2.0
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--recentre-decline", "1.5"])
