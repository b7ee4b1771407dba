"""The bytes: codebooks and constants (:mod:`.constants`, from formats/), the entries of a 4-bit weight,
tensor keys and the packed quant-state (:mod:`.layout`), the spec's reader rules (:mod:`.conformance`)."""
