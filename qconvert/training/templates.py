"""Chat templates rendered within bounds: a template is code from the model's folder, run on every
chat record, so its time and output are bounded, and a template that refuses a record costs that
record only.

transformers renders a template in jinja2's ImmutableSandboxedEnvironment (no file or attribute
escape), but nothing bounds a loop or the text it emits: ``{% for i in range(99999) %}{% for j in
range(99999) %}...`` runs for hours and can emit gigabytes. :func:`render` calls the tokenizer's own
``apply_chat_template`` (so training renders exactly what inference renders) while a guard is
installed on the sandbox transformers compiled the template in: the sandbox routes every call
(``range(...)``, a filter, a method) through ``environment.call`` and every attribute through
``environment.getattr``, and collects the output through ``environment.concat``; the guard checks
the deadline at each, and counts the output as it is produced. Over either bound the render stops
with :class:`TemplateOverrun`. Not bounded: a single expression that builds one huge string in C
(``"x" * 10**10``) is as large as it asks before the guard sees it.

A template that raises for a record (Gemma's and Mistral's refuse a system turn; ``raise_exception``,
an undefined variable, a type error) gives :class:`TemplateRefused`: the caller drops that record and
counts it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..errors import DataError

#: seconds one render may take (a real template renders a record in well under a millisecond);
#: the environment variable QCONVERT_TEMPLATE_SECONDS sets another bound
TEMPLATE_SECONDS = 10.0


class TemplateOverrun(DataError):
    """The chat template ran past its time or output bound: the template's fault, not the record's."""


class TemplateRefused(Exception):
    """The chat template raised for this record (the caller drops the record and counts it)."""


class _Over(Exception):
    pass


def template_seconds() -> float:
    from ..io.readers import seconds_setting

    return seconds_setting("QCONVERT_TEMPLATE_SECONDS", TEMPLATE_SECONDS, DataError)


def render(tok, messages: list, max_chars: int, **kwargs) -> str:
    """``tok.apply_chat_template(messages, tokenize=False, **kwargs)`` within ``max_chars`` characters
    of output and :func:`template_seconds`; see the module docstring."""
    import jinja2

    seconds = template_seconds()
    guard = _Guard(time.monotonic() + seconds, max_chars)
    try:
        with guard.installed(_environment(tok)):
            out = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except _Over as e:
        what = f"ran past {seconds:g} s" if e.args[0] == "time" else f"produced over {max_chars} characters"
        raise TemplateOverrun(f"the chat template {what} rendering one record",
                              hint="the template loops or emits without bound: fix tokenizer_config.json's chat_template "
                                   "(QCONVERT_TEMPLATE_SECONDS sets the time bound)") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as e:
        raise TemplateRefused(" ".join(str(e).split())[:100] or type(e).__name__) from None
    if len(out) > max_chars:  # rendered where the guard could not be installed
        raise TemplateOverrun(f"the chat template produced over {max_chars} characters rendering one record")
    return out


def _environment(tok):
    """The sandbox transformers renders ``tok``'s template in (its compile cache returns the same
    object to apply_chat_template), or None where this transformers keeps it elsewhere."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(tok.get_chat_template()).environment
    except (ImportError, AttributeError, ValueError):
        return None


class _Guard:
    def __init__(self, deadline: float, max_chars: int):
        self.deadline, self.max_chars = deadline, max_chars

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Over("time")

    @contextmanager
    def installed(self, env):
        """Shadow the sandbox's call, getattr and concat on this instance while one render runs."""
        if env is None:
            yield
            return
        cls = type(env)

        def call(context, obj, *args, **kwargs):
            self.check()
            return cls.call(env, context, obj, *args, **kwargs)

        def getattr_(obj, attribute):
            self.check()
            return cls.getattr(env, obj, attribute)

        env.call, env.getattr, env.concat = call, getattr_, self.concat
        try:
            yield
        finally:
            for name in ("call", "getattr", "concat"):
                env.__dict__.pop(name, None)

    def concat(self, pieces) -> str:
        out, n = [], 0
        for piece in pieces:
            n += len(piece)
            if n > self.max_chars:
                raise _Over("size")
            self.check()
            out.append(piece)
        return "".join(out)
