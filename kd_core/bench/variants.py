"""How a model is run in the benchmark: eager PyTorch, ``torch.compile``, dynamic int8, ONNX Runtime.

Each variant turns an fp32 CPU encoder into a callable ``run(input_ids, attention_mask)``. A
variant that cannot run here (no onnxruntime, int8 on a GPU, an export that fails) raises
:class:`VariantUnavailable` with the reason, which the runner reports in the row's status
instead of crashing the grid.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

Runner = Callable[[torch.Tensor, torch.Tensor], object]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The dtype column of an int8 row: weights int8, activations quantised on the fly.
INT8_DTYPE = "int8"


class VariantUnavailable(RuntimeError):
    pass


def random_ids(shape: tuple[int, int], vocab_size: int, seed: int) -> torch.Tensor:
    """Token ids drawn clear of the special tokens ([PAD], [CLS], [unused*]) at the vocab's start."""
    low = min(1000, vocab_size // 2)
    return torch.randint(low, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class VariantContext:
    device: torch.device
    dtype: torch.dtype
    threads: int
    work_dir: Path  # where exported files go (ONNX)


def _on_device(model: torch.nn.Module, ctx: VariantContext) -> torch.nn.Module:
    """The model on the benchmark's device and dtype; the fp32 CPU original stays untouched."""
    if ctx.device.type == "cpu" and ctx.dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(device=ctx.device, dtype=ctx.dtype)


def _torch_runner(model: torch.nn.Module) -> Runner:
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=attention_mask)

    return run


def eager(name: str, model: torch.nn.Module, ctx: VariantContext) -> Runner:
    return _torch_runner(_on_device(model, ctx))


# Every (model, thread count, shape class) is its own compiled graph; the default limit of 8
# per code object would fall back to eager silently in a large grid, and report eager numbers.
COMPILE_RECOMPILE_LIMIT = 64


def compiled(name: str, model: torch.nn.Module, ctx: VariantContext) -> Runner:
    """``torch.compile`` (inductor). Compilation happens at the first call, i.e. in the warm-up."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    try:
        module = torch.compile(_on_device(model, ctx))
    except Exception as exc:  # a platform without inductor support
        raise VariantUnavailable(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc
    return _torch_runner(module)


def int8_dynamic(name: str, model: torch.nn.Module, ctx: VariantContext) -> Runner:
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations per batch)."""
    if ctx.device.type != "cpu":
        raise VariantUnavailable("dynamic int8 quantisation runs on CPU only")
    if ctx.dtype != torch.float32:
        raise VariantUnavailable("dynamic int8 quantisation needs float32 activations; use --dtype float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return _torch_runner(quantized.eval())


class _HiddenStates(torch.nn.Module):
    """Tensors-only outputs for the exporter; the pooler stays in, so the work equals eager's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "pooler_output", None)
        return (out.last_hidden_state,) if pooled is None else (out.last_hidden_state, pooled)


# Exported at one shape and checked at another, so a shape traced in as a constant is caught.
EXPORT_SHAPE = (2, 16)
CHECK_SHAPE = (3, 24)
ONNX_TOLERANCE = 1e-3


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    wrapper = _HiddenStates(model).eval()  # the exporter restores the wrapper's mode afterwards
    ids = random_ids(EXPORT_SHAPE, model.config.vocab_size, seed=0)
    dynamic = {0: "batch", 1: "seq"}
    outputs = {"last_hidden_state": dynamic}
    if getattr(model, "pooler", None) is not None:
        outputs["pooler_output"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notices
        torch.onnx.export(
            wrapper,
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=list(outputs),
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, **outputs},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter needs no onnxscript
        )
    model.eval()


def onnx_runtime(name: str, model: torch.nn.Module, ctx: VariantContext) -> Runner:
    """The model exported with ``torch.onnx.export`` and run by an ONNX Runtime session."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise VariantUnavailable("onnxruntime is not installed: pip install -e '.[bench]'") from exc
    if ctx.dtype != torch.float32:
        raise VariantUnavailable("the ONNX variant exports float32 only")
    provider = "CPUExecutionProvider" if ctx.device.type == "cpu" else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        raise VariantUnavailable(f"onnxruntime has no {provider} here")
    path = ctx.work_dir / f"{name}.onnx"
    if not path.is_file():  # exported once, shared by every thread count
        try:
            _export_onnx(model, path)
        except Exception as exc:
            raise VariantUnavailable(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    # Idle workers spinning between runs would steal the other models' cores in an interleaved run.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=[provider])

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return session.run(None, feed)

    ids = random_ids(CHECK_SHAPE, model.config.vocab_size, seed=1)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    error = float(abs(run(ids, mask)[0] - expected).max())
    if error > ONNX_TOLERANCE:
        raise VariantUnavailable(f"the ONNX graph differs from eager by {error:.2g} at shape {CHECK_SHAPE}")
    return run


VARIANTS: dict[str, Callable[[str, torch.nn.Module, VariantContext], Runner]] = {
    "eager": eager,
    "compile": compiled,
    "int8": int8_dynamic,
    "onnx": onnx_runtime,
}


def variant_dtype(variant: str, dtype: str) -> str:
    return INT8_DTYPE if variant == "int8" else dtype
