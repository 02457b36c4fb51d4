"""Gemma-2 (`Gemma2ForCausalLM`): the LLaMA layout (GeGLU MLP, extra pre/post norms, logit soft-capping) with
alternating sliding-window and full-attention layers and tied embeddings. Only `attention_bias` exists, so the
MLP cannot hold the biases some methods write."""

from slimflow.adapters.base import ModelAdapter

GEMMA2 = ModelAdapter(model_types=("gemma2",), stock_class="Gemma2ForCausalLM", ffn_norm="pre_feedforward_layernorm")
