"""Every command and sub-command of ``python -m trainer`` and ``python -m cvat_sync`` describes itself in
``--help``: a description for each (sub)parser and help text for each argument."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvat_sync.__main__ import build_parser as cvat_sync_parser
from trainer.__main__ import build_parser as trainer_parser

REPO = Path(__file__).resolve().parents[1]


def walk(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every sub-parser below it, with the command line that reaches it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from walk(sub, f"{name} {sub_name}")


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    if not (parser.description or "").strip():
        missing.append("description")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{choice} (no help in the command list)" for choice, sub in action.choices.items()
                        if not any(c.dest == choice and (c.help or "").strip() for c in action._choices_actions)]
            continue
        if action.help is argparse.SUPPRESS:
            continue
        if not (action.help or "").strip():
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [*walk(trainer_parser(), "python -m trainer"), *walk(cvat_sync_parser(), "python -m cvat_sync")]


def test_every_command_has_a_description_and_every_argument_help() -> None:
    parsers = all_parsers()
    names = {name for name, _ in parsers}
    # the walk reaches nested sub-commands (registry actions) and each tool's commands
    assert {"python -m trainer registry prune", "python -m trainer demo", "python -m cvat_sync status"} <= names
    problems = {name: missing for name, parser in parsers if (missing := undocumented(parser))}
    assert problems == {}


def test_predict_is_gone_and_the_epilog_points_to_serverless_annotate() -> None:
    parser = trainer_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "predict" not in commands
    assert "python -m serverless annotate" in parser.format_help()


@pytest.mark.parametrize("argv", [["trainer", "registry", "rollback", "--help"], ["cvat_sync", "list", "--help"]])
def test_help_runs_from_the_command_line(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert out.startswith("usage: python -m ") and len(out.splitlines()) > 5
