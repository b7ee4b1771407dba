"""Typed options through the workflows (issue 22): eval's data options are train's declarations
(qconvert.train.settings), not copies; quantize's settings travel as one frozen QuantizeOptions."""

from __future__ import annotations

import pytest


def _option(command, name):
    [p] = [p for p in command.params if p.name == name]
    return p


@pytest.mark.parametrize("name", ["data", "data_split", "data_config", "fmt", "max_length", "truncation", "train_on_inputs"])
def test_eval_takes_trains_data_options_as_train_declares_them(name):
    """Same spellings (aliases included), default, type and choices: one declaration, two commands.
    Before, eval re-declared them by hand (no --max-seq-length, its own help for --data-split...)."""
    from qconvert.cli.runtime import eval_cmd
    from qconvert.cli.train import train

    ours, theirs = _option(eval_cmd, name), _option(train, name)
    assert ours.opts == theirs.opts and ours.secondary_opts == theirs.secondary_opts
    assert ours.default == theirs.default and ours.is_flag == theirs.is_flag
    assert getattr(ours.type, "choices", None) == getattr(theirs.type, "choices", None) and ours.type.name == theirs.type.name
    assert ours.required == (name == "data")
