"""qconvert's 4-bit modules: :class:`.linear4bit.Linear4bit` and the 4-bit experts of MoE layers
(:mod:`.experts4bit`)."""
