"""Analytic forward FLOPs of a Transformer encoder, per sequence.

For one sequence of ``S`` tokens through ``L`` layers of width ``H`` and FFN width ``I``, the
matrix multiplications cost, in multiply-accumulates (MACs) per layer:

    query, key, value projections   3 * S * H * H
    attention output projection         S * H * H
    attention scores  Q K^T             S * S * H      (summed over heads: heads * S * S * H/heads)
    attention context softmax(.) V      S * S * H
    FFN up and down                 2 * S * H * I

so ``MACs = L * (4 S H^2 + 2 S^2 H + 2 S H I) + P * H^2``, where ``P = 1`` when the model has
a pooler (one dense layer on the first token, BERT and MPNet), and ``FLOPs = 2 * MACs``.

Left out, because they grow as ``S * H`` rather than ``S * H^2`` and are a few per cent at
most: embedding look-ups, biases, residual adds, LayerNorm, softmax, GELU and MPNet's relative
position bias. The head count does not change the total. This is the count that
``torch.utils.flop_counter.FlopCounterMode`` gives for an eager-attention BERT (tested); it
misses the CPU SDPA kernel, so it undercounts the default attention path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    has_pooler: bool = True


def _first_attr(config, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"{type(config).__name__} has none of {names}; the FLOP count needs an encoder config "
        f"(BERT, MPNet, RoBERTa or DistilBERT style)"
    )


def encoder_shape(model) -> EncoderShape:
    """The shape of a Hugging Face encoder model (``AutoModel``) from its config."""
    config = model.config
    return EncoderShape(
        num_layers=_first_attr(config, ("num_hidden_layers", "n_layers")),
        hidden_size=_first_attr(config, ("hidden_size", "dim")),
        intermediate_size=_first_attr(config, ("intermediate_size", "hidden_dim")),
        has_pooler=getattr(model, "pooler", None) is not None,
    )


def encoder_macs_per_seq(shape: EncoderShape, seq_len: int) -> int:
    s, h, i = seq_len, shape.hidden_size, shape.intermediate_size
    per_layer = 4 * s * h * h + 2 * s * s * h + 2 * s * h * i
    return shape.num_layers * per_layer + (h * h if shape.has_pooler else 0)


def encoder_flops_per_seq(shape: EncoderShape, seq_len: int) -> int:
    """Forward FLOPs (2 per MAC) of one sequence of ``seq_len`` tokens; see the module docstring."""
    return 2 * encoder_macs_per_seq(shape, seq_len)


def model_flops_per_seq(model, seq_len: int) -> int:
    return encoder_flops_per_seq(encoder_shape(model), seq_len)
