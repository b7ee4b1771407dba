"""The lazy top-level Python API (issue 22): ``qconvert.quantize``, ``load_model``, ``train``, ``merge``...
resolve to their workflow functions on first use, and ``import qconvert`` imports none of them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import qconvert

LIGHT = """
import sys, qconvert
print(sorted(m for m in ("torch", "transformers", "peft", "triton", "huggingface_hub", "qconvert.training", "qconvert.convert")
             if m in sys.modules))
print(qconvert.__all__)
"""


def test_import_qconvert_loads_no_library_and_no_workflow():
    r = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded, names = r.stdout.splitlines()
    assert loaded == "[]"
    assert {"quantize", "load_model", "train", "merge", "push"} <= set(eval(names))  # the API is listed before it is loaded


@pytest.mark.parametrize("name", sorted(qconvert.API))
def test_each_api_name_is_its_workflow_function(name):
    module, function = qconvert.API[name]
    target = getattr(importlib.import_module(module), function)
    assert callable(target) and getattr(qconvert, name) is target
    assert name in dir(qconvert)


def test_the_commands_python_calls():
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.export.merge import merge_adapter
    from qconvert.model.loader import load_model
    from qconvert.training.loop import train

    assert (qconvert.quantize, qconvert.load_model, qconvert.train, qconvert.merge) == (quantize_checkpoint, load_model, train,
                                                                                         merge_adapter)


def test_train_stays_the_function_after_its_package_is_imported():
    """Why the package is qconvert.training: importing a subpackage binds its name on the parent, so a
    package named ``train`` would replace ``qconvert.train`` the function."""
    import qconvert.training.loop  # noqa: F401

    assert callable(qconvert.train) and qconvert.train.__module__ == "qconvert.training.loop"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        qconvert.quantise  # noqa: B018
