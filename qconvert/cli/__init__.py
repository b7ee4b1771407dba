"""The `qconvert` command line: a thin click layer over the library.

Each command parses its options and calls one library function. Errors the library raises on
purpose (:class:`qconvert.errors.QConvertError`) become a ``qconvert: error:`` line on stderr with a
hint and exit code 1 (see :func:`qconvert.cli.main.main` for every exit code); set QCONVERT_DEBUG=1
to see the full traceback instead. Heavy modules are imported inside the commands so that
``qconvert --help`` starts fast.

- :mod:`.main`: the group, error handling, exit codes, the entry point :func:`.main.run`;
- :mod:`.options`: the options several commands share, each declared once;
- :mod:`.convert` (quantize, verify, inspect), :mod:`.train`, :mod:`.export` (merge,
  export-adapter), :mod:`.hub` (push), :mod:`.runtime` (generate, eval).
"""
