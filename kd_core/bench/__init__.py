"""The inference benchmark behind ``kd bench`` and the pipeline's benchmark stage.

- :mod:`kd_core.bench.flops`: analytic forward FLOPs per sequence (the formula is documented there).
- :mod:`kd_core.bench.variants`: eager, ``torch.compile``, dynamic int8, ONNX Runtime.
- :mod:`kd_core.bench.runner`: the interleaved grid, one row per (model, variant, threads, batch, seq).
- :mod:`kd_core.bench.tables`: speed-ups against a reference and against eager; Parquet + markdown.
"""

from kd_core.bench.flops import EncoderShape, encoder_flops_per_seq, encoder_shape, model_flops_per_seq
from kd_core.bench.runner import (
    COLUMNS,
    BenchGrid,
    BenchModel,
    load_bench_model,
    run_benchmark,
    safetensors_mb,
    summarize,
    time_interleaved,
)
from kd_core.bench.tables import markdown, speedup_frame, variant_speedup_frame, write_benchmark
from kd_core.bench.variants import VARIANTS, VariantUnavailable

__all__ = [
    "COLUMNS", "VARIANTS", "BenchGrid", "BenchModel", "EncoderShape", "VariantUnavailable", "encoder_flops_per_seq",
    "encoder_shape", "load_bench_model", "markdown", "model_flops_per_seq", "run_benchmark", "safetensors_mb",
    "speedup_frame", "summarize", "time_interleaved", "variant_speedup_frame", "write_benchmark",
]
