import pytest
import torch
from conftest import tiny_bert

from kd_core.config import StudentConfig
from kd_core.models.student import (
    StudentConfigError,
    VocabMismatchError,
    build_student,
    check_tokenizer_match,
    default_init_layers,
)


def test_random_student_has_the_requested_shape_and_teacher_vocab():
    teacher = tiny_bert(layers=4, hidden=64, heads=4)
    student = build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, intermediate_size=48))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 32, 4, 48)
    assert c.vocab_size == teacher.config.vocab_size
    assert student.embeddings.word_embeddings.weight.shape == (30522, 32)


def test_init_from_teacher_layers_copies_exactly_those_layers():
    teacher = tiny_bert(layers=4, hidden=64, heads=4)
    cfg = StudentConfig(num_layers=2, hidden_size=64, intermediate_size=128, init="teacher_layers", init_layers=[2, 4])
    student = build_student(teacher, cfg)
    for s_index, t_index in ((0, 1), (1, 3)):
        s_state = student.encoder.layer[s_index].state_dict()
        t_state = teacher.encoder.layer[t_index].state_dict()
        for key in t_state:
            assert torch.equal(s_state[key], t_state[key]), key
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert default_init_layers(6, 12) == [1, 3, 5, 8, 10, 12]  # DistilBERT's choice, 1-based


def test_student_errors_are_clear():
    teacher = tiny_bert(layers=4, hidden=64, heads=4)
    with pytest.raises(VocabMismatchError, match="set it to 30522"):
        build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, vocab_size=30000))
    with pytest.raises(StudentConfigError, match="not divisible"):
        build_student(teacher, StudentConfig(num_layers=2, hidden_size=30))
    with pytest.raises(StudentConfigError, match="widths must match"):
        build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, init="teacher_layers"))
    with pytest.raises(StudentConfigError, match="out of range 1..4"):
        build_student(
            teacher, StudentConfig(num_layers=2, hidden_size=64, intermediate_size=128, init="teacher_layers", init_layers=[1, 5])
        )


def test_init_from_checkpoint_round_trips_and_checks_vocab(tmp_path):
    teacher = tiny_bert(layers=4, hidden=64, heads=4)
    student = build_student(teacher, StudentConfig(num_layers=2, hidden_size=32))
    student.save_pretrained(tmp_path / "s")
    again = build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, init="checkpoint", checkpoint=str(tmp_path / "s")))
    assert torch.equal(again.embeddings.word_embeddings.weight, student.embeddings.word_embeddings.weight)
    with pytest.raises(StudentConfigError, match=r"is 2x32 \(4 heads, FFN 128\), but student.\* asks for 4x312"):
        build_student(teacher, StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "s")))  # 4x312 asked
    other = tiny_bert(layers=1, hidden=32, vocab=1000)
    other.save_pretrained(tmp_path / "o")
    with pytest.raises(VocabMismatchError, match="vocab 1000"):
        build_student(teacher, StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "o")))


def test_classification_student_and_mpnet_family():
    from transformers import MPNetConfig, MPNetModel

    teacher = tiny_bert(layers=2, hidden=64, heads=4)
    student = build_student(teacher, StudentConfig(num_layers=1, hidden_size=32), head="sequence_classification", num_labels=3)
    assert student.config.num_labels == 3 and student.classifier.out_features == 3
    mpnet = MPNetModel(MPNetConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    s = build_student(mpnet, StudentConfig(num_layers=2, hidden_size=64, intermediate_size=128, init="teacher_layers"))
    assert torch.equal(
        s.encoder.relative_attention_bias.weight, mpnet.encoder.relative_attention_bias.weight
    )


def test_tokenizer_mismatch_is_rejected(tokenizer):
    from kd_core.models.registry import load_tokenizer

    check_tokenizer_match(tokenizer, tokenizer)
    with pytest.raises(VocabMismatchError, match="differs from the teacher"):
        check_tokenizer_match(tokenizer, load_tokenizer("mpnet-base"))
