"""What every model-family adapter tells the pipeline and surgery: where things live in a decoder layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Names of the modules of a HF decoder-only model whose layers are `attention + gated MLP`.

    One small subclass per family sets `model_types` (the `config.model_type` values it handles) and,
    where they differ, the attribute names. The adapter holds no state; it is only a map.
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.layers_path.split("."):
            module = getattr(module, name)
        return module

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module holding embeddings, rotary embedding and the layer list (`model.model` for HF)."""
        return model.get_decoder()

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def replace_attn(self, layer: nn.Module, module: nn.Module) -> nn.Module:
        """Put `module` in the place of the layer's attention block; returns the block it replaced."""
        old = self.attn(layer)
        setattr(layer, self.attention, module)
        return old

    def ffn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm in front of the FFN: its input is the residual stream after the attention block."""
        return layer.post_attention_layernorm

    def attention_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        a = self.attn(layer)
        return getattr(a, self.q_proj), getattr(a, self.k_proj), getattr(a, self.v_proj), getattr(a, self.o_proj)

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        m = self.ffn(layer)
        return getattr(m, self.gate_proj), getattr(m, self.up_proj), getattr(m, self.down_proj)

    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def layer_heads(self, model: nn.Module, layer: nn.Module) -> tuple[int, int]:
        """(query heads, KV heads) of one layer, read from the module shapes, not the global config."""
        q, k, _, _ = self.attention_projections(layer)
        hd = self.head_dim(model)
        return q.out_features // hd, k.out_features // hd

    def layer_intermediate(self, layer: nn.Module) -> int:
        return self.mlp_projections(layer)[0].out_features
