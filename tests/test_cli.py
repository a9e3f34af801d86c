"""The CLI only parses and dispatches; training subcommands reach the training entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gatekv.cli import build_parser, main


def test_validate_dispatches(capsys):
    assert main(["validate", "configs/train/tiny-llama-retaining-head.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    # overrides reach the training config parser, and its errors name the key
    assert main(["validate", "configs/train/tiny-llama-retaining-head.yaml", "trainer.max_steps=-3"]) != 0
    assert "max_steps" in capsys.readouterr().err


def test_validate_missing_file_names_it():
    assert main(["validate", "configs/train/does-not-exist.yaml"]) != 0


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])


def test_importing_cli_does_not_import_training_stack():
    code = "import sys, gatekv.cli, gatekv; assert not any(m.split('.')[0] in {'lightning', 'deepspeed', 'datasets', 'peft'} for m in sys.modules), sorted(m for m in sys.modules if m.startswith(('lightning','deepspeed','datasets','peft')))"
    subprocess.run([sys.executable, "-c", code], check=True)
