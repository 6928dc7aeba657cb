"""The stage graph as data: one list of flows, and the checks every graph passes when it is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_flows_registry_the_graphs_the_help_table_and_prefect_yaml_list_the_same_flows():
    from flows.registry import FLOWS, STAGE_NAMES
    from tasks.stages import DAGS

    assert list(DAGS) == list(FLOWS) == list(STAGE_NAMES)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    defaults = {d["flow_name"]: d["entrypoint"] for d in spec["deployments"] if d["name"] == "default"}
    defaults.pop("kd-stage")
    assert defaults == {name: f"{module}:{function}" for name, (module, function) in FLOWS.items()}


def _entry(name, inputs=(), after=()):
    from tasks.graph import StageDef

    return StageDef(name=name, fn=lambda cfg, io: {}, section=lambda c: {}, inputs={n: n for n in inputs}, after=after)


def test_a_graph_reads_only_earlier_entries_and_names_each_once():
    from tasks.graph import check_graph

    graph = check_graph("toy", [_entry("a"), _entry("b", ["a"]), _entry("c", ["a"], after=("b",))])
    assert list(graph) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"toy: stage b reads \['c'\], which no earlier entry declares"):
        check_graph("toy", [_entry("a"), _entry("b", ["c"]), _entry("c")])
    with pytest.raises(ValueError, match=r"stage b reads \['z'\]"):
        check_graph("toy", [_entry("a"), _entry("b", after=("z",))])  # an ordering edge too
    with pytest.raises(ValueError, match="stage a is declared twice"):
        check_graph("toy", [_entry("a"), _entry("a")])


def test_descendants_follow_inputs_not_ordering_edges():
    from tasks.graph import check_graph, descendants

    graph = check_graph("toy", [_entry("a"), _entry("b", ["a"]), _entry("c", ["b"]), _entry("d", after=("c",)),
                                _entry("e", ["d", "a"])])
    assert descendants(graph, {"b"}) == {"b", "c"}
    assert descendants(graph, {"a"}) == {"a", "b", "c", "e"}
    assert descendants(graph, {"d"}) == {"d", "e"}


def test_every_stage_function_reads_the_roles_its_entry_passes(tmp_path):
    """An entry passes its inputs by role; a stage function that asks for a role it was not given
    fails naming the roles it has, instead of reading a wrong positional argument."""
    from kd_core.stages.common import StageInputError, StageIO

    io = StageIO({"teacher": tmp_path / "t", "task": tmp_path / "d"}, tmp_path / "out")
    assert io["teacher"] == tmp_path / "t" and io.get("student") is None
    with pytest.raises(StageInputError, match=r"reads an input 'student'; its graph entry passes \['task', 'teacher'\]"):
        io["student"]
