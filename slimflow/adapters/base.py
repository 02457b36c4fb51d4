"""What a model family owns: where things live in a decoder layer, how its projections split into heads and
channels (fused or not), how they are sliced, which config fields it has, and how it reloads.

The pipeline, surgery, methods and checkpoints only talk to a layer through these methods, so a family whose
layers are `attention + gated MLP` is one `ModelAdapter(...)` in its own file (see docs/architecture.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

# Row segments of an input projection: "q" = query rows (heads·head_dim), "kv" = key or value rows
# (kv_heads·head_dim), "c" = FFN channels. A fused projection lists several, in the order of its rows.
Segments = tuple[str, ...]


@dataclass(frozen=True)
class ModelAdapter:
    """One model family.

    Args:
        model_types: the `config.model_type` values handled.
        stock_class: the transformers class `load_pruned` builds and the remote-code class subclasses.
        attention_inputs: `(module name, row segments)` of the projections feeding attention, e.g.
            `(("q_proj", ("q",)), ("k_proj", ("kv",)), ("v_proj", ("kv",)))` or fused
            `(("qkv_proj", ("q", "kv", "kv")),)`. Query rows come first among the segments, then keys, then values.
        mlp_inputs: the same for the gated MLP: `(("gate_proj", ("c",)), ("up_proj", ("c",)))` or fused
            `(("gate_up_proj", ("c", "c")),)` (gate first).
        bias_flags: config fields that, set to True, give every projection a bias in the stock classes (llama:
            `attention_bias`, `mlp_bias`). Empty: the family cannot hold the output biases some methods write.
        layer_config: the stock attention reads head counts from its `config` at run time (Phi-3 splits its
            fused qkv by `config.num_attention_heads`), so each pruned layer gets its own config copy.
        ffn_norm: the norm in front of the FFN, whose input is the residual stream after the attention block
            (Gemma-2's `post_attention_layernorm` normalises the attention output instead).
    """

    model_types: tuple[str, ...]
    stock_class: str
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_inputs: tuple[tuple[str, Segments], ...] = (("q_proj", ("q",)), ("k_proj", ("kv",)), ("v_proj", ("kv",)))
    o_proj_name: str = "o_proj"
    mlp_inputs: tuple[tuple[str, Segments], ...] = (("gate_proj", ("c",)), ("up_proj", ("c",)))
    down_proj_name: str = "down_proj"
    bias_flags: tuple[str, ...] = ()
    layer_config: bool = False
    ffn_norm: str = "post_attention_layernorm"

    # ------------------------------------------------------------------------------------------- where
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

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
        return getattr(layer, self.ffn_norm)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        """The projection that owns the head units (its input columns are the heads' outputs)."""
        return getattr(self.attn(layer), self.o_proj_name)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        """The projection that owns the FFN channels."""
        return getattr(self.ffn(layer), self.down_proj_name)

    def attention_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Every Linear of the attention block (inputs, then `o_proj`)."""
        a = self.attn(layer)
        return [getattr(a, name) for name, _ in self.attention_inputs] + [self.o_proj(layer)]

    def mlp_linears(self, layer: nn.Module) -> list[nn.Linear]:
        m = self.ffn(layer)
        return [getattr(m, name) for name, _ in self.mlp_inputs] + [self.down_proj(layer)]

    # ------------------------------------------------------------------------------------------- sizes
    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def layer_heads(self, model: nn.Module, layer: nn.Module) -> tuple[int, int]:
        """(query heads, KV heads) of one layer, read from the module shapes, not the global config."""
        return self.heads_of(layer, self.head_dim(model))

    def heads_of(self, layer: nn.Module, hd: int) -> tuple[int, int]:
        heads = self.o_proj(layer).in_features // hd
        for name, segments in self.attention_inputs:
            if "kv" in segments:
                rows = getattr(self.attn(layer), name).out_features // hd - segments.count("q") * heads
                return heads, rows // segments.count("kv")
        raise ValueError("the adapter lists no key/value projection")

    def layer_intermediate(self, layer: nn.Module) -> int:
        return self.down_proj(layer).in_features

    # ---------------------------------------------------------------------------------- weight views
    def _split(self, tensors: list[torch.Tensor], specs, sizes: dict[str, int]) -> list[torch.Tensor]:
        """The row blocks of `tensors` (one per input projection) in segment order: views, no copies."""
        out = []
        for tensor, (_, segments) in zip(tensors, specs):
            out += list(torch.split(tensor, [sizes[s] for s in segments], dim=0))
        return out

    def attention_weights(self, model: nn.Module, layer: nn.Module, grad: bool = False) -> tuple[torch.Tensor, ...]:
        """`(q, k, v, o)` weights (or their `.grad`) as views, whether the projections are fused or not."""
        hd = self.head_dim(model)
        heads, kv = self.heads_of(layer, hd)
        linears = self.attention_linears(layer)
        tensors = [m.weight.grad if grad else m.weight for m in linears]
        q, k, v = self._split(tensors[:-1], self.attention_inputs, {"q": heads * hd, "kv": kv * hd})
        return q, k, v, tensors[-1]

    def mlp_weights(self, layer: nn.Module, grad: bool = False) -> tuple[torch.Tensor, ...]:
        """`(gate, up, down)` weights (or their `.grad`) as views."""
        linears = self.mlp_linears(layer)
        tensors = [m.weight.grad if grad else m.weight for m in linears]
        gate, up = self._split(tensors[:-1], self.mlp_inputs, {"c": self.layer_intermediate(layer)})
        return gate, up, tensors[-1]

    # --------------------------------------------------------------------------------------- slicing
    def slice_heads(self, layer: nn.Module, hd: int, keep_units: list[int]) -> None:
        """Keep only the KV groups `keep_units` (sorted, unique indices into this layer's current KV heads)."""
        heads, kv = self.heads_of(layer, hd)
        group = heads // kv
        rows = {"q": _expand(keep_units, group * hd), "kv": _expand(keep_units, hd)}
        sizes = {"q": heads * hd, "kv": kv * hd}
        attn = self.attn(layer)
        for name, segments in self.attention_inputs:
            setattr(attn, name, slice_linear(getattr(attn, name), _segment_rows(segments, rows, sizes), 0))
        setattr(attn, self.o_proj_name, slice_linear(self.o_proj(layer), rows["q"], 1))
        self.set_head_counts(attn, len(keep_units) * group, len(keep_units))

    def set_head_counts(self, attn: nn.Module, heads: int, kv: int) -> None:
        """The per-module head attributes of a layer of `heads` / `kv` heads: `num_key_value_groups` (what the stock
        attention reads), and `num_heads` / `num_key_value_heads`, set on every family (stock Llama has neither) so
        that a layer's widths read off its attention module; the bundled modeling file sets the same three."""
        attn.num_key_value_groups = heads // kv
        attn.num_heads, attn.num_key_value_heads = heads, kv
        if self.layer_config:
            if not getattr(attn, "_slimflow_layer_config", False):  # first cut: stop sharing the model's config
                attn.config = copy.copy(attn.config)
                attn._slimflow_layer_config = True
            attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv

    def slice_channels(self, layer: nn.Module, keep_channels: list[int]) -> None:
        """Keep only the FFN channels `keep_channels` (sorted, unique)."""
        channels = self.layer_intermediate(layer)
        mlp = self.ffn(layer)
        rows = {"c": torch.tensor(keep_channels, dtype=torch.long)}
        for name, segments in self.mlp_inputs:
            setattr(mlp, name, slice_linear(getattr(mlp, name), _segment_rows(segments, rows, {"c": channels}), 0))
        setattr(mlp, self.down_proj_name, slice_linear(self.down_proj(layer), rows["c"], 1))
        mlp.intermediate_size = len(keep_channels)

    # ------------------------------------------------------------------------------------------ biases
    @property
    def supports_output_bias(self) -> bool:
        return bool(self.bias_flags)

    def add_output_biases(self, model: nn.Module) -> None:
        """Give every projection a (zero) bias and set the config flags, so methods can write `o_proj` /
        `down_proj` biases and checkpoints reload with the stock classes."""
        if not self.bias_flags:
            raise ValueError(
                f"this method writes o_proj/down_proj biases, which the stock {model.config.model_type!r} modules "
                "cannot hold (the family has no bias flags for both blocks): use slimgpt, magnitude, wanda-sp or "
                "taylor for this model, or disable the bias-writing option of the method"
            )
        for layer in self.layers(model):
            for linear in (*self.attention_linears(layer), *self.mlp_linears(layer)):
                if linear.bias is None:
                    w = linear.weight
                    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                               requires_grad=w.requires_grad)
        for flag in self.bias_flags:
            setattr(model.config, flag, True)

    # -------------------------------------------------------------------------------------- reloading
    @property
    def remote_class(self) -> str:
        return f"Slimflow{self.stock_class}"

    def slicing_spec(self) -> dict:
        """How the bundled modeling file cuts a dense-built layer to recorded widths (stored in config.json,
        so that file needs no per-family code)."""
        return {
            "attention": self.attention, "mlp": self.mlp,
            "attention_inputs": [[n, list(s)] for n, s in self.attention_inputs], "o_proj": self.o_proj_name,
            "mlp_inputs": [[n, list(s)] for n, s in self.mlp_inputs], "down_proj": self.down_proj_name,
            "layer_config": self.layer_config,
        }


def _expand(units: list[int], size: int) -> torch.Tensor:
    if not units:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


def _segment_rows(segments: Segments, rows: dict[str, torch.Tensor], sizes: dict[str, int]) -> torch.Tensor:
    """Kept row indices of a (possibly fused) projection: each segment's kept rows, offset by the segments before."""
    out, offset = [], 0
    for s in segments:
        out.append(rows[s] + offset)
        offset += sizes[s]
    return torch.cat(out)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `index` along `dim` (0: output rows, 1: input columns)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.data.index_select(dim, index)
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.data.index_select(0, index)
    elif bias is not None:
        bias = bias.data
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    return new
