"""qconvert's I/O layer: where checkpoints come from and how outputs reach the disk.

- :mod:`.source`: a local folder or a Hub repo id (and revision) resolved to something readable;
- :mod:`.checkpoint`: the local checkpoint reader (a folder or a .safetensors file, sharded or not);
- :mod:`.reader`: the checkpoint reader protocol that local folders and Hub repos both satisfy;
- :mod:`.staging`: output checks, the staging folder, companion-file copying, atomic publish;
- :mod:`.shards`: streaming safetensors shards, shard naming, size-limited sharding, the index;
- :mod:`.cards`: model cards through huggingface_hub's ModelCard/ModelCardData, one template per
  ``base_model_relation`` (quantized, adapter, merge).

Workflows (convert/, export/, hub/, training/, run/, model/) use these and implement none of it. Each
module imports only what it needs, lazily where it is heavy (huggingface_hub, safetensors).
"""
