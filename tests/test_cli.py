"""The CLI shell: version, help, one-line errors with hints, and the debug traceback switch."""

from __future__ import annotations

import os
import subprocess

import pytest

import qconvert
from helpers import QCONVERT



def run(*args, env=None):
    return subprocess.run([*QCONVERT, *args], capture_output=True, text=True, env=env)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qconvert, version {qconvert.__version__}"
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout


@pytest.mark.slow
def test_library_error_is_one_line_with_hint():
    r = run("inspect", "/definitely/not/here")
    assert r.returncode == 1
    assert r.stderr == "qconvert: error: /definitely/not/here: no such file or folder\nhint: pass a checkpoint folder or a .safetensors file\n"
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_debug_env_shows_traceback():
    env = dict(os.environ, QCONVERT_DEBUG="1")
    r = run("inspect", "/definitely/not/here", env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "SourceError" in r.stderr


def test_usage_error_exit_code():
    r = run("inspect")
    assert r.returncode == 2 and r.stderr.startswith("qconvert: error: Missing argument 'PATH'.")
    r = run("no-such-command")
    assert r.returncode == 2
