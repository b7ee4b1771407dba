"""Running a model: `qconvert generate` and `qconvert eval` as library functions.

- :mod:`.inference`: a causal LM (4-bit or plain) ready to run, adapters attached after a shape check;
- :mod:`.generate`: prompts rendered and encoded, text generated;
- :mod:`.evaluate`: loss and perplexity of a model (and its adapters) on a data file.
"""
