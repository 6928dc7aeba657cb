import pytest
import torch

from kd_core.config import LayerMapping, MatchSpec
from kd_core.train.objective import MappingError, ModelShape, Objective, expand_recipe, map_layers


@pytest.mark.parametrize(
    "strategy,m,n,expected",
    [
        ("uniform", 4, 12, [3, 6, 9, 12]),  # TinyBERT's g(m) = 3m
        ("uniform", 4, 6, [2, 3, 5, 6]),  # 1.5, 3, 4.5, 6 rounded half up
        ("uniform", 2, 6, [3, 6]),
        ("last", 2, 6, [5, 6]),
        ("first", 3, 6, [1, 2, 3]),
    ],
)
def test_layer_mapping_strategies(strategy, m, n, expected):
    assert map_layers(LayerMapping(strategy=strategy), m, n) == expected


def test_explicit_mapping_and_its_errors():
    assert map_layers(LayerMapping(strategy="explicit", layers=[2, 4]), 2, 6) == [2, 4]
    with pytest.raises(MappingError, match="2 entries but the student has 3"):
        map_layers(LayerMapping(strategy="explicit", layers=[2, 4]), 3, 6)
    with pytest.raises(MappingError, match=r"out of range: the teacher has layers 1..6"):
        map_layers(LayerMapping(strategy="explicit", layers=[2, 7]), 2, 6)
    with pytest.raises(MappingError, match="student layers <= teacher layers"):
        map_layers(LayerMapping(strategy="uniform"), 8, 6)
    with pytest.raises(ValueError, match="needs mapping.layers"):
        LayerMapping(strategy="explicit")


def test_tinybert_recipe_expands_to_the_paper_matches():
    specs = expand_recipe("tinybert_intermediate", LayerMapping(), 4, 12)
    triples = [(s.feature, s.student_layer, s.teacher_layer, s.projection) for s in specs]
    assert triples[0] == ("embeddings", 0, 0, "W_e")
    assert ("attention_scores", 2, 6, None) in triples and ("hidden", 4, 12, "W_h") in triples
    assert len(specs) == 1 + 2 * 4


def test_unknown_recipe_and_feature():
    with pytest.raises(MappingError, match="unknown recipe 'tinybert'"):
        expand_recipe("tinybert", LayerMapping(), 2, 4)
    with pytest.raises(ValueError, match="unknown feature 'attn'"):
        MatchSpec(feature="attn", loss="attention_mse")


def test_objective_rejects_impossible_matches_early():
    student, teacher = ModelShape(2, 32, 4), ModelShape(4, 64, 8)
    with pytest.raises(MappingError, match="student has 4 heads and the teacher 8"):
        Objective([MatchSpec(feature="attention_scores", loss="attention_mse", student_layer=1, teacher_layer=2)], student, teacher)
    with pytest.raises(MappingError, match="set projection"):
        Objective([MatchSpec(feature="hidden", loss="hidden_mse", student_layer=1, teacher_layer=2)], student, teacher)
    with pytest.raises(MappingError, match=r"teacher_layer must be in 0..4"):
        Objective(
            [MatchSpec(feature="hidden", loss="hidden_mse", student_layer=1, teacher_layer=5, projection="W")],
            student,
            teacher,
        )
    with pytest.raises(ValueError, match="attention_mse_typo"):
        Objective([MatchSpec(feature="logits", loss="attention_mse_typo")], student, teacher)


def test_matches_sharing_a_projection_share_its_weights():
    specs = expand_recipe("tinybert_intermediate", LayerMapping(), 2, 4)
    objective = Objective(specs, ModelShape(2, 32, 4), ModelShape(4, 64, 4))
    assert set(objective.projections) == {"W_e", "W_h"}
    assert isinstance(objective.projections["W_h"], torch.nn.Linear)
    assert objective.projections["W_h"].weight.shape == (64, 32)
