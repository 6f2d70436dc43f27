"""The one way tests call the captioner CLI in process: ``cli("index", ...)``, ``run_cli(source, ...)``.

Arguments are turned into strings (paths welcome); the exit code is checked
(``exit_code``, 0 unless told) and the click result returned, so a failure
shows the command's output and exception.
"""

from __future__ import annotations

import click
from click.testing import CliRunner, Result

from pipeline.cli import main


def cli(*args, exit_code: int = 0, command: click.Command = main) -> Result:
    """``captioner ARGS...`` (or ``command ARGS...``), asserting its exit code."""
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == exit_code, (result.output, result.exception)
    return result


def run_cli(*args, expect_exit: int = 0) -> Result:
    """``captioner run ARGS... --no-progress``, asserting its exit code."""
    return cli("run", *args, "--no-progress", exit_code=expect_exit)
