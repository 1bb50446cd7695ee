"""parity.cli imports a subcommand's module only when that command runs; `parity --help` still lists them all."""

from __future__ import annotations

import argparse
import importlib

import pytest

from parity import cli


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help()


def test_help_lists_every_command_as_the_full_parser_does() -> None:
    full = _help(cli.build_parser())
    assert _help(cli.build_parser(only="run")) == full
    for name in cli.LAZY_COMMANDS:
        assert name in full
        assert _help(cli.build_parser(only=name)) == full, name


def test_the_table_matches_each_modules_own_help_line() -> None:
    for name, (module, help_line) in cli.LAZY_COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        importlib.import_module(module).add_parser(sub)
        (action,) = [a for a in sub._choices_actions if a.dest == name]
        assert action.help == help_line, f"{name}: LAZY_COMMANDS says {help_line!r}, {module} says {action.help!r}"


def test_only_the_running_commands_module_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    imported: list[str] = []
    real = importlib.import_module

    def recording(name: str, package: str | None = None) -> object:
        imported.append(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", recording)
    cli.build_parser(only="run")
    assert imported == []
    cli.build_parser(only="bench")
    assert imported == ["parity.bench.command"]


@pytest.mark.parametrize("name", sorted(cli.LAZY_COMMANDS))
def test_a_lazy_command_parses_with_its_real_parser(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--debug", name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: parity {name}")
    action = cli.build_parser(only="run")._subparsers._group_actions[0]  # type: ignore[union-attr]
    stub = dict(action.choices or {})[name]
    assert out != stub.format_help()  # the module's own parser ran, not the help-only entry


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["benchh"])
    assert exc.value.code == 2
    assert "invalid choice: 'benchh'" in capsys.readouterr().err
