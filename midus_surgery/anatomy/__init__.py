"""What a decoder block is made of, found by tracing one tiny layer."""
