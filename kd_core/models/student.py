"""Build a student from a config: random, from chosen teacher layers, or from a checkpoint.

The student has the teacher's architecture family and uses the teacher's tokenizer, so the
two see identical token ids; a vocabulary mismatch is rejected before any training starts.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from kd_core.config import StudentConfig
from kd_core.models.adaptors import ModelAdaptor
from kd_core.models.registry import HEADS, load_model


class VocabMismatchError(ValueError):
    pass


class StudentConfigError(ValueError):
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


def build_student(
    teacher: PreTrainedModel,
    cfg: StudentConfig,
    head: str | None = None,
    **config_extra,
) -> PreTrainedModel:
    """A student for ``teacher``; ``head`` is one of registry.HEADS (None: bare encoder)."""
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
        return student
    config = student_config(teacher.config, cfg, **config_extra)
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
