"""Tensors in and out: base tensor sources, the streaming shard writer, output directories."""
