"""The README's first two commands are what CI runs, so the two cannot drift apart."""

import os
import re

from helpers import ROOT


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _readme_first_commands():
    """The first fenced block of README.md: (install line, test line)."""
    block = re.search(r"```(?:sh|bash)?\n(.*?)```", _read("README.md"), re.S).group(1)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    return lines


def _ci_lines():
    return [line.strip() for line in _read(".ci", "run").splitlines()]


def test_readme_starts_with_install_and_test_commands():
    install, test = _readme_first_commands()
    steps = [s.strip() for s in install.split("&&")]
    assert steps[0].startswith("python3 -m venv ") and "bin/activate" in steps[1]
    assert steps[2] == "pip install -e '.[test]'"
    assert "graphquant convert models/fer_mini_xception.pb" in install  # the bundled real model
    assert test.startswith("python -m pytest ")


def test_ci_runs_the_readme_install_and_test_commands():
    install, test = _readme_first_commands()
    pip_step = next(s.strip() for s in install.split("&&") if s.strip().startswith("pip install"))
    ci = _ci_lines()
    assert any(line == pip_step or line.startswith(pip_step + " ||") for line in ci), ci
    assert test in ci, ci


def test_ci_uses_a_fresh_venv_and_fails_when_nothing_is_collected():
    ci = _read(".ci", "run")
    assert "python3 -m venv .venv-ci" in ci and ". .venv-ci/bin/activate" in ci
    assert '"$status" -eq 5' in ci
