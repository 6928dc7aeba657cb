"""A fine-tuned student in the forms a deployment uses: ONNX (float32) and ONNX int8 (dynamic
quantisation of the weights by ONNX Runtime).

Each form is checked against the eager model on the evaluation split (the largest logit
difference, and for a classifier how often the predicted labels agree) and timed side by side
with eager in one interleaved run (kd_core.bench), so its speed-up comes from the same seconds
of the same machine. Each form's folder holds ``model.onnx`` and the tokenizer: it is servable
on its own.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from kd_core.bench.runner import make_inputs, summarize, time_interleaved
from kd_core.stop import check_stop
from kd_core.train.data import pad_batch

FORMS = ("onnx", "onnx_int8")
ONNX_FILE = "model.onnx"
OPSET = 17
# the float32 graph is the eager model: anything above this is an export bug, not rounding
FLOAT32_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The exported float32 graph does not compute what the eager model computes."""


class _Logits(torch.nn.Module):
    """Tensors in, logits out: the graph ``torch.onnx.export`` traces."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors))).logits


def model_input_names(model, tokenizer) -> list[str]:
    """The inputs the graph takes: ids and mask, plus segment ids when the model has a type embedding."""
    names = ["input_ids", "attention_mask"]
    types = getattr(model.config, "type_vocab_size", 0) or 0
    if "token_type_ids" in tokenizer.model_input_names and types > 0:
        names.append("token_type_ids")
    return names


def export_onnx(model: torch.nn.Module, input_names: Sequence[str], path: Path) -> None:
    """``model``'s logits as an ONNX graph with dynamic batch and sequence axes."""
    model.eval()
    # traced at one shape, run at others: a shape baked in as a constant fails the parity check
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    dynamic = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            _Logits(model, input_names).eval(),
            tuple(example[name] for name in input_names),
            str(path),
            input_names=list(input_names),
            output_names=["logits"],
            dynamic_axes={**{name: dynamic for name in input_names}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter needs no onnxscript
        )


def _no_preprocessing_advice(record) -> bool:
    return not str(record.msg).startswith("Please consider to run pre-processing")


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights, activations quantised per batch."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        # the pre-processing ONNX Runtime recommends: graph optimisation and shape inference first
        quant_pre_process(str(source), str(prepared), auto_merge=True)
        root = logging.getLogger()
        root.addFilter(_no_preprocessing_advice)  # logged on the root logger even after the pre-processing
        try:
            quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
        finally:
            root.removeFilter(_no_preprocessing_advice)


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle workers spinning between the interleaved timing calls would steal eager's cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


Predict = Callable[[dict[str, torch.Tensor]], np.ndarray]


def eager_predict(model: torch.nn.Module) -> Predict:
    def predict(batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()

    return predict


def onnx_predict(session, input_names: Sequence[str]) -> Predict:
    def predict(batch: dict[str, torch.Tensor]) -> np.ndarray:
        return session.run(["logits"], {name: batch[name].numpy() for name in input_names})[0]

    return predict


def batched_logits(predict: Predict, examples: list[dict], input_names: Sequence[str], pad_token_id: int,
                   batch_size: int = 64) -> np.ndarray:
    """Logits over ``examples``, padded per batch as kd_core.evaluate pads them."""
    outputs = []
    for start in range(0, len(examples), batch_size):
        check_stop("export parity")
        batch = pad_batch(examples[start : start + batch_size], pad_token_id)
        if "token_type_ids" in input_names and "token_type_ids" not in batch:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        outputs.append(predict({name: batch[name] for name in input_names}))
    return np.concatenate(outputs)


def parity(reference: np.ndarray, logits: np.ndarray, is_regression: bool) -> dict[str, float]:
    """The largest |Δlogit| against the reference and, for a classifier, the share of rows whose
    argmax label agrees (regression: the share within 0.1 of the reference score)."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    if is_regression:
        agreement = float(np.mean(diff[:, 0] <= 0.1))
    else:
        agreement = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    return {"max_abs_logit_diff": float(diff.max()), "label_agreement": agreement}


@dataclass(frozen=True)
class TimingCell:
    batch_size: int = 32
    seq_len: int = 128
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    seed: int = 0


def time_forms(predicts: dict[str, Predict], input_names: Sequence[str], vocab_size: int, cell: TimingCell) -> dict[str, dict]:
    """p50/p95 latency and seq/s of every form on one random batch, interleaved (kd_core.bench)."""
    ids, mask = make_inputs(cell.batch_size, cell.seq_len, vocab_size, torch.device("cpu"), cell.seed)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    batch = {name: batch[name] for name in input_names}
    runs = {name: (lambda predict=predict: predict(batch)) for name, predict in predicts.items()}
    threads_before = torch.get_num_threads()
    if cell.threads:
        torch.set_num_threads(cell.threads)
    try:
        for _ in range(cell.warmup):
            for run in runs.values():
                run()
        seconds = time_interleaved(runs, cell.repeats)
    finally:
        torch.set_num_threads(threads_before)
    return {name: summarize(values, cell.batch_size) for name, values in seconds.items()}


def export_forms(model: torch.nn.Module, tokenizer, model_dir: Path, examples: list[dict], is_regression: bool,
                 out: Path, forms: Sequence[str] = FORMS, cell: TimingCell = TimingCell(),
                 score: Callable[[np.ndarray], float] | None = None) -> pd.DataFrame:
    """Write each form to ``out/<form>/`` (graph + tokenizer + config), check it against eager on
    ``examples`` and time it beside eager. One row per form, eager first; ``score`` (logits ->
    task score), when given, scores every form on the same rows."""
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"unknown export form {unknown[0]!r}; choose from {', '.join(FORMS)}")
    model.eval()
    names = model_input_names(model, tokenizer)
    float32 = out / "onnx" / ONNX_FILE
    float32.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, names, float32)
    paths = {"onnx": float32}
    if "onnx_int8" in forms:
        paths["onnx_int8"] = out / "onnx_int8" / ONNX_FILE
        paths["onnx_int8"].parent.mkdir(parents=True, exist_ok=True)
        quantize_int8(float32, paths["onnx_int8"])
    if "onnx" not in forms:  # exported only as the int8 form's source
        shutil.rmtree(float32.parent)
        del paths["onnx"]
    predicts: dict[str, Predict] = {"eager": eager_predict(model)}
    for form, path in paths.items():
        tokenizer.save_pretrained(path.parent)
        model.config.save_pretrained(path.parent)  # id2label for whoever serves the graph
        predicts[form] = onnx_predict(onnx_session(path, cell.threads), names)
    logits = {form: batched_logits(predict, examples, names, tokenizer.pad_token_id) for form, predict in predicts.items()}
    if "onnx" in logits:
        error = parity(logits["eager"], logits["onnx"], is_regression)["max_abs_logit_diff"]
        if error > FLOAT32_TOLERANCE:
            raise ExportError(f"the float32 ONNX graph of {model_dir} differs from eager by {error:.3g} in a logit "
                              f"(tolerance {FLOAT32_TOLERANCE}); it is not the same model")
    speed = time_forms(predicts, names, model.config.vocab_size, cell)
    rows = []
    for form in predicts:
        path = paths.get(form)
        rows.append({
            "form": form,
            "path": str(path) if path else str(model_dir),
            "size_mb": (path.stat().st_size if path else _weights_bytes(model_dir)) / 2**20,
            "rows": len(examples),
            **parity(logits["eager"], logits[form], is_regression),
            **({"score": float(score(logits[form]))} if score else {}),
            **speed[form],
            "batch_size": cell.batch_size, "seq_len": cell.seq_len, "threads": cell.threads or torch.get_num_threads(),
        })
    frame = pd.DataFrame(rows)
    frame["speedup_vs_eager"] = frame["seq_per_s"] / float(frame.loc[frame["form"] == "eager", "seq_per_s"].iloc[0])
    return frame


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def export_markdown(frame: pd.DataFrame, title: str) -> str:
    has_score = "score" in frame
    header = ["form", "MB", "max abs Δlogit", "label agreement", *(["score"] if has_score else []),
              "p50 ms", "seq/s", "speed-up"]
    lines = [f"# {title}", "",
             f"{int(frame['rows'].iloc[0])} evaluation rows; timed at batch {int(frame['batch_size'].iloc[0])} x "
             f"{int(frame['seq_len'].iloc[0])} tokens on {int(frame['threads'].iloc[0])} threads, interleaved.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples():
        cells = [row.form, f"{row.size_mb:.1f}", f"{row.max_abs_logit_diff:.2g}", f"{100 * row.label_agreement:.2f}%",
                 *([f"{row.score:.2f}"] if has_score else []), f"{row.latency_p50_ms:.1f}", f"{row.seq_per_s:.1f}",
                 f"{row.speedup_vs_eager:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
