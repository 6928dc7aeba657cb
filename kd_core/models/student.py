"""Build a student from a config: random, from chosen teacher layers, pruned from the teacher
(kd_core.models.prune), or from a checkpoint.

The student has the teacher's architecture family and uses the teacher's tokenizer, so the
two see identical token ids; a vocabulary mismatch is rejected before any training starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from kd_core.config import StudentConfig
from kd_core.errors import UserError
from kd_core.models.adaptors import ModelAdaptor
from kd_core.models.registry import HEADS, load_model


class VocabMismatchError(UserError, ValueError):
    pass


class StudentConfigError(UserError, ValueError):
    pass


# DistilBERT names its sizes differently; every other supported family uses BERT's names.
_SIZE_FIELDS = {
    "distilbert": {"layers": "n_layers", "hidden": "dim", "heads": "n_heads", "intermediate": "hidden_dim"},
}
_BERT_FIELDS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
}


def _fields(model_type: str) -> dict[str, str]:
    return _SIZE_FIELDS.get(model_type, _BERT_FIELDS)


def teacher_sizes(config: PretrainedConfig) -> dict[str, int]:
    names = _fields(config.model_type)
    return {key: getattr(config, attr) for key, attr in names.items()}


def student_config(teacher_config: PretrainedConfig, cfg: StudentConfig, **extra) -> PretrainedConfig:
    sizes = teacher_sizes(teacher_config)
    heads = cfg.num_heads or sizes["heads"]
    if cfg.hidden_size % heads:
        raise StudentConfigError(
            f"student.hidden_size {cfg.hidden_size} is not divisible by student.num_heads {heads}; "
            f"pick a hidden size that is a multiple of the head count"
        )
    teacher_vocab = teacher_config.vocab_size
    if cfg.vocab_size is not None and cfg.vocab_size != teacher_vocab:
        raise VocabMismatchError(
            f"student.vocab_size={cfg.vocab_size} but the teacher's vocabulary has {teacher_vocab} tokens; "
            f"the student uses the teacher's tokenizer, so drop student.vocab_size or set it to {teacher_vocab}"
        )
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    names = _fields(config.model_type)
    setattr(config, names["layers"], cfg.num_layers)
    setattr(config, names["hidden"], cfg.hidden_size)
    setattr(config, names["heads"], heads)
    setattr(config, names["intermediate"], cfg.intermediate_size or 4 * cfg.hidden_size)
    if cfg.max_position_embeddings:
        config.max_position_embeddings = cfg.max_position_embeddings
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, cfg.dropout)
    config.architectures = None
    config.kd_init_layers = None  # set by the inits that copy teacher layers; never inherited from a teacher
    config.kd_init_hidden = None
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def default_init_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers including the first and the last (DistilBERT-style)."""
    if student_layers > teacher_layers:
        raise StudentConfigError(
            f"cannot initialise {student_layers} student layers from a {teacher_layers}-layer teacher"
        )
    return [int(round(x)) for x in np.linspace(1, teacher_layers, student_layers)]


_LAYER_KEY = re.compile(r"\.layer\.\d+\.|^layer\.\d+\.|\.layers\.\d+\.")


def _copy_from_teacher_layers(student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int]) -> None:
    s_adaptor, t_adaptor = ModelAdaptor(student), ModelAdaptor(teacher)
    try:
        if len(layers) != s_adaptor.num_layers:
            raise StudentConfigError(
                f"student.init_layers has {len(layers)} entries for a {s_adaptor.num_layers}-layer student"
            )
        bad = [layer for layer in layers if not 1 <= layer <= t_adaptor.num_layers]
        if bad:
            raise StudentConfigError(f"student.init_layers {bad} out of range 1..{t_adaptor.num_layers}")
        # Everything outside the blocks (embeddings, MPNet's relative bias, pooler) copies by name.
        s_base, t_base = student.base_model, teacher.base_model
        s_state = s_base.state_dict()
        shared = {
            name: tensor
            for name, tensor in t_base.state_dict().items()
            if not _LAYER_KEY.search(name) and name in s_state and s_state[name].shape == tensor.shape
        }
        s_base.load_state_dict(shared, strict=False)
        s_blocks, t_blocks = s_adaptor.layers(), t_adaptor.layers()
        for s_block, t_index in zip(s_blocks, layers):
            s_block.load_state_dict(t_blocks[t_index - 1].state_dict())
    finally:
        s_adaptor.remove_hooks()
        t_adaptor.remove_hooks()


def calibration_batches(examples: Sequence[dict], rows: int, seed: int, batch_size: int, pad_token_id: int) -> list[dict]:
    """``rows`` examples drawn without replacement (seeded), padded into batches."""
    from kd_core.train.data import pad_batch

    if not examples:
        raise StudentConfigError("student.init 'pruned' needs calibration rows, and the data has none")
    picked = np.sort(np.random.default_rng(seed).choice(len(examples), size=min(rows, len(examples)), replace=False))
    return [pad_batch([examples[i] for i in picked[start:start + batch_size]], pad_token_id)
            for start in range(0, len(picked), batch_size)]


def _shape(config: PretrainedConfig) -> str:
    return (f"{config.num_hidden_layers}x{config.hidden_size} ({config.num_attention_heads} heads, "
            f"FFN {config.intermediate_size})")


def check_checkpoint_shape(wanted: PretrainedConfig, checkpoint: PretrainedConfig, cfg: StudentConfig) -> None:
    """init=checkpoint trains the checkpoint as it is: its shape must be the one student.* asks for."""
    fields = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    if any(getattr(wanted, f) != getattr(checkpoint, f, None) for f in fields):
        raise StudentConfigError(
            f"student.checkpoint {cfg.checkpoint} is {_shape(checkpoint)}, but student.* asks for {_shape(wanted)}; "
            f"set student.num_layers / hidden_size / num_heads / intermediate_size to the checkpoint's shape")


def check_student_shape(teacher_config: PretrainedConfig, cfg: StudentConfig,
                        checkpoint_config: PretrainedConfig | None = None) -> None:
    """Fail before any work when ``cfg`` cannot be built from this teacher."""
    config = student_config(teacher_config, cfg)
    if cfg.init == "checkpoint" and checkpoint_config is not None:
        check_checkpoint_shape(config, checkpoint_config, cfg)
    if cfg.init == "pruned":
        from kd_core.models.prune import check_prunable

        check_prunable(teacher_config, config)


def build_student(
    teacher: PreTrainedModel,
    cfg: StudentConfig,
    head: str | None = None,
    calibration: Sequence[dict] | None = None,
    pad_token_id: int = 0,
    plan_out: Path | None = None,
    **config_extra,
) -> PreTrainedModel:
    """A student for ``teacher``; ``head`` is one of registry.HEADS (None: bare encoder).

    ``init: pruned`` cuts the student out of ``teacher`` (with the teacher's class, so a
    fine-tuned teacher's head comes along) by activation importance on ``calibration`` examples
    (student.prune picks how many, with which seed); ``plan_out`` receives kept.parquet and
    scores.parquet.
    """
    import transformers

    if head not in HEADS:
        raise StudentConfigError(f"unknown head {head!r}; choose one of {[h for h in HEADS if h]}")
    auto = getattr(transformers, HEADS[head])
    if cfg.init == "checkpoint":
        student = load_model(cfg.checkpoint, head=head, **config_extra)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise VocabMismatchError(
                f"student checkpoint {cfg.checkpoint} has vocab {student.config.vocab_size}, the teacher "
                f"{teacher.config.vocab_size}; a student must share the teacher's tokenizer"
            )
        check_checkpoint_shape(student_config(teacher.config, cfg), student.config, cfg)
        return student
    config = student_config(teacher.config, cfg, **config_extra)
    if cfg.init == "pruned":
        from kd_core.models.prune import prune_model

        if calibration is None:
            raise StudentConfigError("student.init 'pruned' needs calibration rows (corpus blocks or task rows) "
                                     "from the stage that builds the student")
        batches = calibration_batches(calibration, cfg.prune.calibration_rows, cfg.prune.seed,
                                      cfg.prune.batch_size, pad_token_id)
        student, plan = prune_model(teacher, config, batches, cfg.prune.layers)
        student.config.kd_init_layers = list(plan.layers)
        student.config.kd_init_hidden = [int(i) for i in plan.hidden]  # the teacher channel of each student channel
        if plan_out is not None:
            plan.write(plan_out)
        return student
    student = auto.from_config(config)
    if cfg.init == "teacher_layers":
        t_sizes, s_sizes = teacher_sizes(teacher.config), teacher_sizes(config)
        different = {k: (s_sizes[k], t_sizes[k]) for k in ("hidden", "heads", "intermediate") if s_sizes[k] != t_sizes[k]}
        if different:
            detail = ", ".join(f"{k} {s} vs teacher {t}" for k, (s, t) in different.items())
            raise StudentConfigError(
                f"student.init 'teacher_layers' copies teacher blocks, so the widths must match ({detail}); "
                f"use init 'random' for a narrower student"
            )
        layers = cfg.init_layers or default_init_layers(cfg.num_layers, t_sizes["layers"])
        with torch.no_grad():
            _copy_from_teacher_layers(student, teacher, layers)
        student.config.kd_init_layers = list(layers)
    return student


def check_tokenizer_match(teacher_tokenizer, student_tokenizer, student_name: str = "student") -> None:
    """Reject a student tokenizer whose token ids differ from the teacher's."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:5]
    raise VocabMismatchError(
        f"{student_name}'s tokenizer differs from the teacher's ({len(s_vocab)} vs {len(t_vocab)} tokens; "
        f"first differences {differing}); distil with the teacher's tokenizer"
    )


def init_layers_of(model: PreTrainedModel) -> list[int] | None:
    """The teacher layers a student was copied or pruned from (mapping strategy student_init)."""
    layers = getattr(model.config, "kd_init_layers", None)
    return list(layers) if layers else None


def init_projections_from_channels(projections, model: PreTrainedModel) -> list[str]:
    """Start each student->teacher projection as the pruned channel selection (student channel i
    -> teacher channel kd_init_hidden[i]), so hidden matches start from the pruned init's own error.
    Returns the projections set."""
    channels = getattr(model.config, "kd_init_hidden", None)
    if not channels:
        return []
    done = []
    for name, linear in projections.items():
        if linear.in_features != len(channels) or max(channels) >= linear.out_features:
            continue
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[torch.as_tensor(channels), torch.arange(len(channels))] = 1.0
            linear.bias.zero_()
        done.append(name)
    return done
