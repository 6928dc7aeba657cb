"""The squad-distill flow's stages (same contract as :mod:`kd_core.stages.common`).

``prepare_qa`` writes the question rows: offline that is SQuAD v1.1 dev split by article into
``dev-articles-train`` and ``dev-articles-eval`` (``qa.source: dev-articles``), online the
official train and dev files (``qa.source: train-dev``). ``finetune_teacher_qa`` fits the
teacher's QA head, ``task_distill_qa`` runs TinyBERT's two task-distillation steps on the QA
windows (the intermediate matches, then soft cross-entropy on the start/end logits),
``evaluate_qa`` scores exact match and F1, and ``append_qa_report`` ends the shared pipeline
report with the EM/F1 table and a statement of which data the numbers come from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from kd_core.config import LayerMapping, PipelineConfig, TrainConfig, for_task
from kd_core.data.qa import DEV_ARTICLES_EVAL, DEV_ARTICLES_TRAIN, build_features, sample_questions, split_by_article
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.stages import glue
from kd_core.stages.common import (
    MODEL_SUBDIR,
    StageInputError,
    StageIO,
    data_root,
    finish_training,
    init_projections,
    quiet_transformers,
    shape_of,
)
from kd_core.train.recipes import expand_recipe

SPLIT_FILE = "qa_split.json"  # which files are the train and eval parts, and where they came from


def qa_task_name(cfg: PipelineConfig) -> str:
    return cfg.qa.task_name


# ---- data ------------------------------------------------------------------------------------------
def prepare_qa(cfg: PipelineConfig, io: StageIO) -> dict:
    """The question rows of the train and eval parts. Inputs: none."""
    from kd_core.data.loaders import load_split, write_split
    from kd_core.data.tasks import get_task

    section, out = cfg.qa, io.out
    spec = get_task(section.task_name)
    root = data_root(cfg)
    if section.source == "dev-articles":
        dev = load_split(spec, root, "dev")
        split = split_by_article(dev, section.eval_fraction, section.seed, section.articles)
        train, evaluation = split.train, split.eval
        names = (DEV_ARTICLES_TRAIN, DEV_ARTICLES_EVAL)
        titles = {"train_titles": split.train_titles, "eval_titles": split.eval_titles}
        source = dev.attrs.get("source", [])
        note = (
            f"{spec.description}: only the dev set is used, split by article into {DEV_ARTICLES_TRAIN} "
            f"({len(split.train_titles)} articles) and {DEV_ARTICLES_EVAL} ({len(split.eval_titles)} other articles); "
            "scores on it are not official SQuAD dev scores and are not comparable with published ones"
        )
    else:
        train, evaluation = load_split(spec, root, "train"), load_split(spec, root, "dev")
        names = ("train", "dev")
        titles = {"train_titles": sorted(train["title"].unique()), "eval_titles": sorted(evaluation["title"].unique())}
        source = train.attrs.get("source", []) + evaluation.attrs.get("source", [])
        note = f"{spec.description}: official train and dev sets"
    train = sample_questions(train, section.train_limit, section.seed)
    evaluation = sample_questions(evaluation, section.eval_limit, section.seed)
    result = {"task": spec.name, "source": section.source, "train_split": names[0], "eval_split": names[1]}
    for role, name, frame in (("train", names[0], train), ("eval", names[1], evaluation)):
        result[f"{role}_questions"] = len(frame)
        result[f"{role}_articles"] = int(frame["title"].nunique())
        result[f"{role}_fingerprint"] = write_split(frame, out / f"{name}.parquet", spec, name)
    (out / SPLIT_FILE).write_text(json.dumps({**result, "note": note, "source_files": source, **titles}, indent=2))
    return result


def read_qa_split(qa_dir: Path) -> dict:
    path = Path(qa_dir) / SPLIT_FILE
    if not path.is_file():
        raise StageInputError(f"expected {path} from prepare_qa; rerun prepare_qa")
    return json.loads(path.read_text())


def qa_rows(qa_dir: Path, role: str) -> tuple[pd.DataFrame, str]:
    """The ``train`` or ``eval`` questions of a prepare_qa artifact, and that part's split name."""
    from kd_core.data.loaders import read_split

    name = read_qa_split(qa_dir)[f"{role}_split"]
    path = Path(qa_dir) / f"{name}.parquet"
    if not path.is_file():
        raise StageInputError(f"expected the {role} questions at {path}; rerun prepare_qa")
    return read_split(path)[0], name


def _features(cfg: PipelineConfig, rows: pd.DataFrame, tokenizer, with_labels: bool):
    section = cfg.qa
    return build_features(rows, tokenizer, section.max_seq_length, section.doc_stride, section.max_query_length, with_labels)


def _load_qa_model(source: str | Path):
    with quiet_transformers():  # an encoder dir gains a fresh QA head here, by design
        return load_model(source, head="question_answering")


# ---- training --------------------------------------------------------------------------------------
def finetune_teacher_qa(cfg: PipelineConfig, io: StageIO) -> dict:
    """The teacher learns the task: start/end cross-entropy on the train windows. Inputs: ``data``."""
    import torch

    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer

    train = cfg.finetune_teacher.train
    tokenizer = load_tokenizer(cfg.teacher)
    torch.manual_seed(train.seed)
    model = _load_qa_model(cfg.teacher)
    features = _features(cfg, qa_rows(io["data"], "train")[0], tokenizer, with_labels=True)
    shape = shape_of(model)
    specs = expand_recipe("qa_finetune", LayerMapping(), shape.num_layers, shape.num_layers)
    trainer = DistillTrainer(None, model, Objective(specs, shape, None), examples=features.inputs, config=train, output_dir=io.work,
                             pad_token_id=tokenizer.pad_token_id, callbacks=io.callbacks)
    return {**finish_training(trainer, trainer.train(), tokenizer, io.out), "train_windows": len(features)}


def task_distill_qa_intermediate(cfg: PipelineConfig, io: StageIO) -> dict:
    """The intermediate step on QA windows. Inputs: ``teacher``, ``student``, ``data``."""
    return task_distill_qa(cfg, io, "intermediate")


def task_distill_qa_prediction(cfg: PipelineConfig, io: StageIO) -> dict:
    """The prediction step on QA windows. Inputs: ``teacher``, ``student``, ``data``."""
    return task_distill_qa(cfg, io, "prediction")


def task_distill_qa(cfg: PipelineConfig, io: StageIO, step: str) -> dict:
    """TinyBERT task distillation on QA windows: ``intermediate`` (task_distill.recipe, e.g. the
    embedding, attention and hidden matches), then ``prediction`` (qa_soft_cross_entropy on the
    start and end logits at task_distill.temperature)."""
    import torch

    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer

    if step not in ("intermediate", "prediction"):
        raise StageInputError(f"task_distill_qa step must be intermediate or prediction, got {step!r}")
    section = cfg.task_distill
    teacher_dir, student_dir = io["teacher"], io["student"]
    train: TrainConfig = section.intermediate if step == "intermediate" else section.prediction
    tokenizer = load_tokenizer(teacher_dir / MODEL_SUBDIR)
    teacher = _load_qa_model(teacher_dir / MODEL_SUBDIR)
    torch.manual_seed(train.seed)
    student = _load_qa_model(student_dir / MODEL_SUBDIR)
    s_shape, t_shape = shape_of(student), shape_of(teacher)
    if step == "intermediate":
        recipe, params = section.recipe, section.recipe_params
    else:
        recipe, params = "qa_prediction", {"temperature": section.temperature}
    specs = expand_recipe(recipe, section.mapping, s_shape.num_layers, t_shape.num_layers, params=params)
    objective = Objective(specs, s_shape, t_shape)
    init_projections(objective, student_dir / MODEL_SUBDIR)
    features = _features(cfg, qa_rows(io["data"], "train")[0], tokenizer, with_labels=True)
    trainer = DistillTrainer(teacher, student, objective, examples=features.inputs, config=train, output_dir=io.work,
                             pad_token_id=tokenizer.pad_token_id,
                             callbacks=io.callbacks)
    return {**finish_training(trainer, trainer.train(), tokenizer, io.out), "train_windows": len(features)}


# ---- evaluation and report -------------------------------------------------------------------------
def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def evaluate_qa(cfg: PipelineConfig, io: StageIO) -> dict:
    """Exact match and F1 of each model on the eval part; ``score`` is F1 (v2.0: F1 at the
    no-answer threshold tuned on this split, the official best_f1). Inputs: the models by name
    (``teacher``, ``student``), and ``data``."""
    models = io.others("data")
    return evaluate_qa_models(cfg, models, io["data"], io.out)


def evaluate_qa_models(cfg: PipelineConfig, models: dict[str, Path], qa_dir: Path, out: Path) -> dict:
    from kd_core.data.qa import postprocess_predictions
    from kd_core.evaluate.squad import predict_span_logits, squad_metrics

    section = cfg.qa
    rows, split = qa_rows(qa_dir, "eval")
    golds = dict(zip(rows["id"], rows["answers_text"]))
    records = []
    windows: dict[str, int] = {}
    for name, model_dir in models.items():
        tokenizer = load_tokenizer(model_dir / MODEL_SUBDIR)
        model = _load_qa_model(model_dir / MODEL_SUBDIR)
        features = _features(cfg, rows, tokenizer, with_labels=False)
        starts, ends = predict_span_logits(model, features.inputs, tokenizer.pad_token_id, section.eval_batch_size)
        spans = postprocess_predictions(rows, features, starts, ends, section.n_best, section.max_answer_length)
        texts = {qid: span.text for qid, span in spans.items()}
        if section.version_2:
            na_scores = {qid: span.na_score for qid, span in spans.items()}
            metrics = squad_metrics(golds, texts, na_scores, threshold=0.0)
            threshold = metrics["best_f1_thresh"]
            score = metrics["best_f1"]
        else:
            metrics, threshold = squad_metrics(golds, texts), None
            score = metrics["f1"]
        answers = {qid: span.answer(threshold) for qid, span in spans.items()}
        (out / f"predictions-{name}.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
        if section.version_2:
            na = {qid: _finite(span.na_score) for qid, span in spans.items()}
            (out / f"na-scores-{name}.json").write_text(json.dumps(na, indent=1))
        metrics.pop("total")
        if not section.version_2:  # every v1.1 question has an answer: no breakdown to show
            metrics = {k: v for k, v in metrics.items() if not k.startswith(("has_ans_", "no_ans_"))}
        windows[name] = len(features)
        records.append({"model": name, "task": section.task_name, "split": split, "rows": len(rows), "score": score, **metrics})
    frame = pd.DataFrame(records)
    frame.to_parquet(out / "metrics.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(records, indent=2))
    result = {"split": split, "rows": len(rows), **{f"{name}_windows": n for name, n in windows.items()}}
    for r in records:
        result.update({f"{r['model']}_score": round(float(r["score"]), 4), f"{r['model']}_exact_match": round(float(r["exact_match"]), 4),
                       f"{r['model']}_f1": round(float(r["f1"]), 4)})
    return result


def report(cfg: PipelineConfig, io: StageIO) -> dict:
    """The GLUE flows' report (:func:`kd_core.stages.glue.report`) titled with the QA task and the
    eval part's split, ending with the EM/F1 table and the data note. Inputs: the GLUE report's,
    and ``data``."""
    result = glue.report(report_config(cfg, io["data"]), io)
    append_qa_report(cfg, io["evaluation"], io["data"], io.out)
    return result


def report_config(cfg: PipelineConfig, qa_dir: Path) -> PipelineConfig:
    """The config the shared report reads: the QA task's name and the eval part's split name."""
    split = read_qa_split(qa_dir)["eval_split"]
    task = for_task(cfg, qa_task_name(cfg)).task
    return cfg.model_copy(update={"task": task.model_copy(update={"eval_split": split})})


def append_qa_report(cfg: PipelineConfig, eval_dir: Path, qa_dir: Path, out: Path) -> None:
    """EM and F1 per model, and which data the numbers come from, at the end of report.md."""
    split = read_qa_split(qa_dir)
    metrics = pd.read_parquet(eval_dir / "metrics.parquet")
    lines = ["", f"## {qa_task_name(cfg)}: exact match and F1 on {split['eval_split']}", ""]
    if cfg.qa.version_2:
        lines += ["| model | EM | F1 | best EM (threshold) | best F1 (threshold) | has-answer F1 | no-answer F1 |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.exact_match:.2f} | {r.f1:.2f} | {r.best_exact:.2f} ({r.best_exact_thresh:.3f}) | "
                  f"{r.best_f1:.2f} ({r.best_f1_thresh:.3f}) | {r.has_ans_f1:.2f} | {r.no_ans_f1:.2f} |" for r in metrics.itertuples()]
        lines += ["", "EM and F1 at no-answer threshold 0; best EM/F1 at the threshold tuned on this split "
                  "(the official best_thresh search); score = best F1."]
    else:
        lines += ["| model | EM | F1 |", "|---|---|---|"]
        lines += [f"| {r.model} | {r.exact_match:.2f} | {r.f1:.2f} |" for r in metrics.itertuples()]
        lines += ["", "score = F1."]
    lines += [
        "",
        f"Data: trained on {split['train_split']} ({split['train_questions']} questions, {split['train_articles']} articles), "
        f"evaluated on {split['eval_split']} ({split['eval_questions']} questions, {split['eval_articles']} articles).",
        f"{split['note']}.",
    ]
    report = out / "report.md"
    if not report.is_file():
        raise StageInputError(f"the shared report wrote no {report}")
    with open(report, "a") as handle:
        handle.write("\n".join(lines) + "\n")
