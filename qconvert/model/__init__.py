"""A 4-bit checkpoint as a transformers model: loading, the checks between checkpoint and model.

- :mod:`.loader`: :func:`load_model`, a checkpoint onto qconvert's ``Linear4bit`` modules;
- :mod:`.checks`: config.json read once, the model class, checkpoint-versus-model checks;
- :mod:`.adapters`: a PEFT LoRA folder read and checked against a model (load, merge, export, push);
- :mod:`.conversions`: where transformers puts each checkpoint tensor (renamed or merged weights).
"""
