"""Tiny random configs of real architectures, shared by the tests.

Each is small enough that a model builds and runs a forward in milliseconds on CPU, yet keeps
the features that make the architecture different (GQA, sliding windows, post-norms,
parallel residual, an FFN without an ``mlp`` submodule, mixtures of experts...).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# model_type -> config kwargs. 4 layers everywhere so layouts have room to insert.
TINY: dict[str, dict] = {
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, sliding_window=16,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
        use_sliding_window=True, sliding_window=16, max_window_layers=2,
    ),
    "qwen3": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128,
    ),
    "gemma2": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128,
        sliding_window=16,
    ),
    "phi3": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=128, use_parallel_residual=True,
    ),
    # mixtures of experts: transformers stacks the experts' weights in [experts, ...] parameters and
    # saves them one tensor per expert (Mixtral also under another module name)
    "mixtral": dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(  # plus a gated shared expert beside the routed ones
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ),
    "opt": dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, word_embed_proj_dim=64,
    ),
}

ARCHS = sorted(TINY)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of ``model_type``; ``overrides`` replace entries of the defaults."""
    kwargs = {**TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)
