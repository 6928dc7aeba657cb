"""The meta-kd stage table: per-domain data, teachers, students, evaluations and one report.

Nodes (``f`` a training fraction, ``s`` a seed; ``/s`` on teachers only with ``teacher_seeds: each``)::

    prepare_task@<d>                         every domain's train/dev rows
    encode_domains                           h(X) under the pre-trained teacher: meta-teachers' first prototype pass
    finetune_teacher@<t>/f<f>                (a)'s teacher: target t alone
    finetune_mixed/f1.0, meta_teacher/f1.0   (b)'s and (c)'s teachers on all domains (shared by targets)
    finetune_mixed@<t>/f<f>, meta_teacher@<t>/f<f>   the same with t's rows subsampled (f < 1)
    distill_single@<t>/f<f>/s<s>, distill_mixed@..., meta_distill@...   the students
    evaluate@<t>/f<f>/s<s>                   the students on t's dev split
    evaluate_teachers@<t>/f<f>               the three teachers on t's dev split
    report

Each node's section holds exactly what changes its output - its domains, fraction (with the
subsample seed when it subsamples) and seed - so reruns, and runs that add seeds or fractions,
reuse every node already computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from kd_core.config import PipelineConfig, for_task
from kd_core.metakd.report import STUDENT_METHODS, teacher_base_config
from kd_core.stages import metakd as mk
from tasks.glue_dag import PREPARE_TASK
from tasks.graph import StageDef, dump, for_domain

_TEACHER_STAGE = {"single": "finetune_teacher", "mixed": "finetune_mixed", "meta": "meta_teacher"}
_STUDENT_STAGE = {"single": "distill_single", "mixed": "distill_mixed", "meta": "meta_distill"}


def fraction_tag(fraction: float) -> str:
    return f"f{float(fraction)}"


@dataclass(frozen=True)
class Cell:
    """One (target, fraction) of the grid; ``seed`` None for a teacher shared by every seed."""

    target: str
    fraction: float
    seed: int | None = None

    @property
    def full(self) -> bool:
        return self.fraction == 1.0


def teacher_seed(cfg: PipelineConfig, seed: int) -> int | None:
    """The seed that names a teacher node: None when teachers are trained once (seeds[0])."""
    return seed if cfg.meta_kd.teacher_seeds == "each" else None


def teacher_node(kind: str, cell: Cell) -> str:
    stage = _TEACHER_STAGE[kind]
    seed = f"/s{cell.seed}" if cell.seed is not None else ""
    if kind != "single" and cell.full:  # every target shares the all-domain teachers at fraction 1
        return f"{stage}/{fraction_tag(cell.fraction)}{seed}"
    return f"{stage}@{cell.target}/{fraction_tag(cell.fraction)}{seed}"


def student_node(method: str, target: str, fraction: float, seed: int) -> str:
    return f"{_STUDENT_STAGE[method]}@{target}/{fraction_tag(fraction)}/s{seed}"


def _data_section(c: PipelineConfig, cell: Cell) -> dict:
    """Which target rows a node sees: the fraction, and the subsample seed when it subsamples."""
    section = {"target": cell.target if not cell.full else None, "fraction": cell.fraction}
    if not cell.full:
        section["subsample_seed"] = c.meta_kd.subsample_seed
    return section


def _teacher_stage(cfg: PipelineConfig, kind: str, cell: Cell) -> StageDef:
    domains = [cell.target] if kind == "single" else list(cfg.meta_kd.domains)
    seed = cell.seed if cell.seed is not None else cfg.meta_kd.seeds[0]

    def section(c: PipelineConfig) -> dict:
        meta = c.meta_kd
        result = {
            **_data_section(c, Cell(cell.target, cell.fraction)),
            "teacher": c.teacher,
            "kind": kind,
            "domains": domains,
            "domain_order": list(meta.domains),
            "max_seq_length": c.task.max_seq_length,
            "train": teacher_base_config(c).model_dump(mode="json", exclude={"seed"}),
            "teacher_epochs": meta.teacher_epochs,
            "teacher_min_steps": meta.teacher_min_steps,
            "seed": seed,
        }
        if kind == "meta":
            result.update(alpha=meta.alpha, gamma1=meta.gamma1, corruption_dropout=meta.corruption_dropout,
                          normalize_scores=meta.normalize_scores)
        return result

    shared = kind != "single" and cell.full
    register = {"single": "teacher", "mixed": "mixed-teacher", "meta": "meta-teacher"}[kind] if cell.full else None
    return StageDef(
        name=teacher_node(kind, cell),
        fn=partial(mk.teacher_stage, kind=kind, target=cell.target if (kind == "single" or not cell.full) else None,
                   fraction=cell.fraction, seed=seed),
        inputs={**{d: f"prepare_task@{d}" for d in domains}, **({"reps": "encode_domains"} if kind == "meta" else {})},
        section=section,
        register_as=register,
        trains=True,
        task_of=(lambda c: "amazon") if shared else (lambda c: mk.domain_task(cell.target)),
    )


def _student_stage(cfg: PipelineConfig, method: str, target: str, fraction: float, seed: int) -> StageDef:
    teacher = teacher_node(method, Cell(target, fraction, teacher_seed(cfg, seed)))

    def section(c: PipelineConfig) -> dict:
        meta = c.meta_kd
        result = {
            **_data_section(c, Cell(target, fraction)),
            "method": method,
            "init": c.teacher,
            "student": dump(meta.student),
            "mapping": dump(meta.mapping),
            "distill": meta.distill.model_dump(mode="json", exclude={"seed"}),
            "prediction": meta.prediction.model_dump(mode="json", exclude={"seed"}),
            "temperature": meta.temperature,
            "max_seq_length": c.task.max_seq_length,
            "target": target,
            "domain_order": list(meta.domains),
            "seed": seed,
        }
        if method == "meta":
            result["gamma2"] = meta.gamma2
        return result

    return StageDef(
        name=student_node(method, target, fraction, seed),
        fn=partial(mk.student_stage, method=method, target=target, fraction=fraction, seed=seed),
        inputs={"teacher": teacher, "task": f"prepare_task@{target}"},
        section=section,
        trains=True,
        task_of=lambda c: mk.domain_task(target),
    )


def _evaluation_stage(name: str, target: str, models: dict[str, str]) -> StageDef:
    """``models``: metric name -> node; it also reads the target's data."""
    return StageDef(
        name=name,
        fn=partial(mk.evaluation_stage, target=target),
        inputs={**models, "task": f"prepare_task@{target}"},
        section=lambda c: {"task": dump(for_task(c, mk.domain_task(target)).task), "models": list(models)},
        task_of=lambda c: mk.domain_task(target),
    )


def metakd_grid(cfg: PipelineConfig):
    """(target, fraction, seed) of every student, in the order the flow runs them."""
    meta = cfg.meta_kd
    return [(t, f, s) for f in meta.fractions for t in meta.target_domains for s in meta.seeds]


def metakd_dag(cfg: PipelineConfig) -> list[StageDef]:
    meta = cfg.meta_kd
    methods = list(STUDENT_METHODS) if meta.baselines else ["meta"]
    stages: list[StageDef] = [for_domain(PREPARE_TASK, d, {}) for d in meta.domains]
    stages.append(StageDef(
        name="encode_domains",
        fn=mk.encode_domains_stage,
        inputs={d: f"prepare_task@{d}" for d in meta.domains},
        section=lambda c: {"teacher": c.teacher, "domains": list(c.meta_kd.domains), "max_seq_length": c.task.max_seq_length},
        task_of=lambda c: "amazon",
    ))
    names: set[str] = set()

    def add(stage: StageDef) -> None:
        if stage.name not in names:  # the all-domain teachers at fraction 1 serve every target
            names.add(stage.name)
            stages.append(stage)

    teacher_cells = sorted({(t, f, teacher_seed(cfg, s)) for t, f, s in metakd_grid(cfg)},
                           key=lambda x: (-x[1], meta.target_domains.index(x[0]), x[2] or 0))
    for target, fraction, seed in teacher_cells:
        cell = Cell(target, fraction, seed)
        for kind in methods:
            add(_teacher_stage(cfg, kind, cell))
        add(_evaluation_stage(
            f"evaluate_teachers@{target}/{fraction_tag(fraction)}" + (f"/s{seed}" if seed is not None else ""),
            target,
            {f"{kind}_teacher": teacher_node(kind, cell) for kind in methods},
        ))
    student_evals = []
    for target, fraction, seed in metakd_grid(cfg):
        for method in methods:
            add(_student_stage(cfg, method, target, fraction, seed))
        name = f"evaluate@{target}/{fraction_tag(fraction)}/s{seed}"
        add(_evaluation_stage(name, target, {m: student_node(m, target, fraction, seed) for m in methods}))
        student_evals.append(name)
    teacher_evals = [s.name for s in stages if s.name.startswith("evaluate_teachers@")]
    stages.append(_report_stage(cfg, student_evals, teacher_evals))
    return stages


def _report_stage(cfg: PipelineConfig, student_evals: list[str], teacher_evals: list[str]) -> StageDef:
    students = [(t, f, s, name) for (t, f, s), name in zip(metakd_grid(cfg), student_evals)]
    teachers = [(*_parse_eval(name, cfg), name) for name in teacher_evals]
    return StageDef(
        name="report",
        fn=partial(mk.report_stage, student_evals=students, teacher_evals=teachers),
        inputs={name: name for name in (*student_evals, *teacher_evals)},
        section=lambda c: {"profile": c.profile, "task": {"max_seq_length": c.task.max_seq_length, "eval_split": c.task.eval_split},
                           "teacher": c.teacher, "teacher_train": dump(teacher_base_config(c)), "meta_kd": dump(c.meta_kd)},
    )


def _parse_eval(name: str, cfg: PipelineConfig) -> tuple[str, float, int]:
    """(target, fraction, seed) of an ``evaluate_teachers@<t>/f<f>[/s<s>]`` node."""
    target, rest = name.split("@", 1)[1].split("/", 1)
    parts = rest.split("/")
    seed = int(parts[1][1:]) if len(parts) > 1 else cfg.meta_kd.seeds[0]
    return target, float(parts[0][1:]), seed
