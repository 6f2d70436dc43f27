"""The CLI's shared options: one declaration each, checked at parse time, help defaults from the config.

Each test goes through the `captioner` command line (click's CliRunner, or a
fresh interpreter where what is imported is the point).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import DEVICES, CaptionConfig, DecodeConfig, EmbedConfig


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (same sys.path), so sys.modules starts empty."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


# -- --device is one vocabulary, refused at parse time --------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "photos", "--out", "out.parquet"],
        ["search", "a dog", "--index", "missing.duckdb"],
        ["serve", "--index", "missing.duckdb"],
    ],
    ids=["run", "search", "serve"],
)
def test_an_unknown_device_is_a_usage_error_before_anything_runs(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*argv, "--device", "gpu")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--device'" in result.output
    for device in DEVICES:
        assert repr(device) in result.output  # the choices are listed


def test_every_command_with_device_takes_the_config_vocabulary():
    seen = []
    for name, command in main.commands.items():
        for param in command.params:
            if param.name == "device":
                seen.append(name)
                assert tuple(param.type.choices) == DEVICES, name
    assert sorted(seen) == ["run", "search", "serve"]


# -- --storage-option is parsed once, the same way everywhere ------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "photos", "--out", "out.parquet"],
        ["serve", "--index", "missing.duckdb"],
        ["export", "alt-text", "--out", "alt.csv"],
        ["index", "s3://bucket/captions/"],
    ],
    ids=["run", "serve", "export", "index"],
)
def test_a_storage_option_without_equals_is_a_usage_error(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*argv, "--storage-option", "endpoint_url")
    assert result.exit_code == 2, result.output
    assert "'endpoint_url' is not KEY=VALUE" in result.output and "--storage-option" in result.output


# -- no command module imports the CLI back ------------------------------------------------


@pytest.mark.parametrize(
    "module, command, argv",
    [
        ("pipeline.serve.command", "serve", ["--index", "missing.duckdb", "--storage-option", "anon=true"]),
        ("pipeline.export.command", "export_command", ["alt-text", "--index", "missing.duckdb", "--out", "a.csv",
                                                       "--storage-option", "anon=true"]),
        ("pipeline.search.commands", "search_command", ["beach", "--index", "missing.duckdb"]),
    ],
)
@pytest.mark.subprocess
def test_command_modules_run_without_importing_the_cli(module, command, argv, tmp_path):
    code = f"""
        import os, sys
        os.chdir({str(tmp_path)!r})
        from click.testing import CliRunner
        from {module} import {command} as command
        result = CliRunner().invoke(command, {argv!r})
        assert result.exit_code == 1, (result.output, result.exception)
        assert "missing.duckdb" in result.output, result.output
        assert "pipeline.cli" not in sys.modules, "the command imported pipeline.cli"
        print("ok")
    """
    done = fresh_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# -- help shows the defaults the config decides -------------------------------------------------


def help_of(command_name: str, option: str) -> str:
    command = main.commands[command_name]
    ctx = command.make_context(command_name, [], resilient_parsing=True)
    for param in command.params:
        if option in getattr(param, "opts", ()):
            return " ".join(param.get_help_record(ctx)[1].split())
    raise AssertionError(f"{command_name} has no {option}")


@pytest.mark.parametrize(
    "option, default",
    [
        ("--caption-length", CaptionConfig().length),
        ("--batch-size", CaptionConfig().batch_size),
        ("--max-crops", CaptionConfig().max_crops or "the checkpoint's config.json, 12"),
        ("--dtype", CaptionConfig().dtype),
        ("--embed-batch-size", EmbedConfig().batch_size),
        ("--max-pixels", DecodeConfig().max_pixels),
        ("--caption-model", CaptionConfig().model),
        ("--embed-model", EmbedConfig().model),
        ("--device", "auto"),
    ],
)
def test_run_help_shows_the_config_defaults(option, default):
    assert f"[default: {default}" in help_of("run", option)


@pytest.mark.subprocess
def test_help_defaults_follow_the_config_not_a_copy_of_it():
    """Change the config's defaults before the CLI is built: its help follows."""
    code = """
        from pipeline.config import CaptionConfig, DecodeConfig, EmbedConfig, RunConfig
        CaptionConfig.model_fields["batch_size"].default = 5
        CaptionConfig.model_fields["max_crops"].default = 7
        EmbedConfig.model_fields["batch_size"].default = 9
        DecodeConfig.model_fields["max_pixels"].default = 1234
        RunConfig.model_fields["device"].default = "cpu"
        from click.testing import CliRunner
        from pipeline.cli import main
        for argv in (["run", "--help"], ["search", "--help"], ["serve", "--help"]):
            print(" ".join(CliRunner().invoke(main, argv).output.split()))
    """
    done = fresh_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    run_help, search_help, serve_help = done.stdout.splitlines()
    for shown in ("[default: 5]", "[default: 7", "[default: 9]", "[default: 1234]", "[default: cpu]"):
        assert shown in run_help, shown
    assert "[default: cpu]" in search_help and "[default: cpu]" in serve_help


def test_index_help_shows_the_build_defaults():
    from pipeline.search import index as ix

    # was the three --hnsw-* defaults (the HNSW path is gone)
    assert f"[default: {ix.DEFAULT_ANN_MIN_ROWS}]" in help_of("index", "--ann-min-rows")


def test_export_probe_help_names_thresholds():
    text = help_of("export", "--probe")
    assert ">0.8" in text and "=yes" in text


def test_the_index_default_is_the_same_everywhere():
    defaults = {}
    for name in ("search", "sql", "duplicates", "serve"):
        (param,) = [p for p in main.commands[name].params if p.name == "index_path"]
        defaults[name] = param.default
    (db,) = [p for p in main.commands["index"].params if p.name == "db"]
    defaults["index --db"] = db.default
    assert set(defaults.values()) == {"index.duckdb"}, defaults
    assert "index.duckdb" in help_of("export", "--index")
