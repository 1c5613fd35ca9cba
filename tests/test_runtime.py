"""graphquant.runtime: TensorFlow is imported with oneDNN on unless the user chose otherwise."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env_extra=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_sets_onednn_before_tensorflow():
    r = _run("import graphquant, os; from graphquant.runtime import tf; tf(); "
             "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])", drop=("TF_ENABLE_ONEDNN_OPTS",))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    assert "RuntimeWarning" not in r.stderr


def test_user_choice_is_respected_silently():
    r = _run("import graphquant, os; from graphquant.runtime import tf; tf(); "
             "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])", {"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
    assert "RuntimeWarning" not in r.stderr


def test_warns_when_tensorflow_was_imported_first_without_setting():
    r = _run("import tensorflow; import graphquant", drop=("TF_ENABLE_ONEDNN_OPTS",))
    assert r.returncode == 0, r.stderr
    assert "TF_ENABLE_ONEDNN_OPTS=1" in r.stderr and "RuntimeWarning" in r.stderr
