"""Per-stage code fingerprints: a stage's key hashes only the kd_core code its function can run.

The scope tests edit sources through the analyzer's reader (nothing on disk changes) and follow a
changed key down the graph, as a rerun would: a stage whose code changed writes a new artifact,
so every stage that reads it gets a new key too. The completeness test runs the stages of a
small tinybert-full graph for real and checks that every kd_core function they call is inside
the reach the fingerprint hashes.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

from kd_core.fingerprint import ROOT, Analyzer, code_fingerprint, reach

FAST = {f"{section}.max_steps": 3 for section in (
    "general_distill.train", "finetune_teacher.train", "task_distill.intermediate", "task_distill.prediction")}
FAST.update({"augment.n_aug": 1, "task.train_limit": 24, "task.eval_limit": 16, "corpus.max_blocks": 32,
             "benchmark.repeats": 1, "export.enabled": True, "export.repeats": 1})


@pytest.fixture
def data_env(monkeypatch, kd_data_dir, tmp_path):
    monkeypatch.setenv("KD_DATA_DIR", str(kd_data_dir))
    monkeypatch.setenv("KD_HOME", str(tmp_path / "home"))


def _graph(flow="tinybert-full", **overrides):
    from flows.profiles import load_profile
    from tasks.stages import dag_for

    return dag_for(flow, load_profile("smoke", {**FAST, **overrides}))


def _edited(under: str):
    """An analyzer that sees every module docstring under ``kd_core/<under>`` edited."""
    def read(path: Path) -> str:
        source = path.read_text()
        if path.is_relative_to(ROOT / under):
            return '"""edited."""\n' + source
        return source
    return Analyzer(read=read)


def _changed_keys(graph, analyzer) -> set[str]:
    from tasks.graph import descendants

    baseline = Analyzer()  # one parse of the sources as they are, for every stage
    own = {name for name, stage in graph.items()
           if code_fingerprint(stage.fn, baseline) != code_fingerprint(stage.fn, analyzer)}
    return descendants(graph, own)


@pytest.mark.parametrize("flow", ["tinybert-full", "minilm", "squad-distill"])
def test_an_edit_under_bench_changes_the_benchmark_and_report_keys_only(data_env, flow):
    graph = _graph(flow, **{"export.enabled": False})
    assert _changed_keys(graph, _edited("bench")) == {"benchmark", "report"}
    if flow != "squad-distill":
        # the export times its forms with kd_core.bench.runner, so it is the one other reader
        assert _changed_keys(_graph(flow), _edited("bench")) == {"benchmark", "report", "export"}


@pytest.mark.parametrize("flow", ["tinybert-full", "minilm", "squad-distill", "meta-kd"])
def test_an_edit_under_losses_changes_the_training_stages_and_their_descendants(data_env, flow):
    from tasks.graph import descendants

    graph = _graph(flow, **({"export.enabled": False} if flow in ("squad-distill", "meta-kd") else {}))
    training = {name for name, stage in graph.items() if stage.trains}
    changed = _changed_keys(graph, _edited("losses"))
    # meta-kd's encode_domains encodes with kd_core.metakd.objectives, whose module imports the losses
    extra = {"encode_domains"} if flow == "meta-kd" else set()
    assert changed == descendants(graph, training | extra)
    data = {name for name in graph if name.split("@")[0] in ("prepare_task", "prepare_corpus", "augment", "prepare_qa")}
    assert data and not changed & data  # the data stages keep their keys


def test_an_edit_to_one_stage_function_leaves_its_siblings_alone(data_env):
    """A change in glue.py's benchmark function reaches benchmark alone, not every stage of glue.py."""
    graph = _graph()

    def read(path: Path) -> str:
        source = path.read_text()
        if path == ROOT / "stages" / "glue.py":
            line = '    models, out = io.others("task"), io.out'
            return source.replace(line, line + "  # edited")
        return source

    edited, baseline = Analyzer(read=read), Analyzer()
    assert "# edited" in edited.source_of(("kd_core.stages.glue", "benchmark"))
    own = {n for n, s in graph.items() if code_fingerprint(s.fn, baseline) != code_fingerprint(s.fn, edited)}
    assert own == {"benchmark"}


def test_the_key_uses_the_stage_code_not_the_whole_package(tmp_path):
    from kd_core.artifacts import ArtifactStore, code_version

    store = ArtifactStore(tmp_path)
    assert store.stage_key("s", {"a": 1}, code="x") != store.stage_key("s", {"a": 1}, code="y")
    assert store.stage_key("s", {"a": 1}) == store.stage_key("s", {"a": 1}, code=code_version())


def test_lazy_packages_reexports_and_check_only_validators_resolve():
    analyzer = Analyzer()
    # kd_core.models serves ModelAdaptor through __getattr__: the adaptors module is reached
    assert ("kd_core.models", "__getattr__") == analyzer.resolve(("kd_core.models", "ModelAdaptor"))
    assert "kd_core.models.adaptors" in {m for m, _ in analyzer.closure(("kd_core.models", "__getattr__"))}
    # a loss-name check decides whether a config loads, not what a stage computes
    assert not {m for m, _ in analyzer.closure(("kd_core.config", "_known_loss"))} & {"kd_core.losses.registry"}


def _unit_of_frame(code) -> tuple[str, str | None] | None:
    path = Path(code.co_filename)
    if not path.is_relative_to(ROOT) or path.suffix != ".py":
        return None
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module = ".".join(["kd_core", *parts])
    top = code.co_qualname.split(".")[0]
    if top.startswith("<") or not code.co_flags & inspect.CO_NEWLOCALS:
        return (module, None)  # module code, a module-level lambda or comprehension, a class body run on import
    return (module, top)


def test_every_kd_core_function_a_stage_runs_is_in_its_fingerprint(data_env, tmp_path, one_thread):
    """Each stage of a small tinybert-full graph (export included) run for real under a profiler:
    every kd_core function it calls, at any depth, belongs to the units its key hashes."""
    from flows.profiles import load_profile
    from kd_core.artifacts import ArtifactStore
    from kd_core.stages.common import StageIO

    cfg = load_profile("smoke", FAST)
    graph = _graph()
    store = ArtifactStore(tmp_path / "artifacts")
    done, missing = {}, {}
    for name, stage in graph.items():
        called: set = set()

        def profile(frame, event, arg):
            if event == "call":
                unit = _unit_of_frame(frame.f_code)
                if unit is not None:
                    called.add(unit)

        inputs = {role: done[node] for role, node in stage.inputs.items()}
        work = store.work_dir(name, "k")

        def traced(out, stage=stage, inputs=inputs, work=work, profile=profile):
            io = StageIO({role: a.path for role, a in inputs.items()}, out, work)
            sys.setprofile(profile)  # the stage's own calls only, not the store's around it
            try:
                return stage.run(cfg, io)
            finally:
                sys.setprofile(None)

        done[name] = store.write(name, "k", traced)
        reached = reach(stage.fn)
        outside = {u for u in called if u not in reached and u[0] != "kd_core.fingerprint"}
        if outside:
            missing[name] = sorted(outside, key=str)
        print(name, len(called), "units called,", len(reached), "hashed")
        assert called, name
    assert not missing, missing


def test_fingerprints_computed_from_many_threads_at_once_agree(data_env):
    """Stage threads ask for their keys at once, each analysis filling shared caches: every thread
    gets the answer a single thread gets. (The race that made this a lock, CPython 3.11's
    "AST constructor recursion depth mismatch" from concurrent parses, showed only in two loaded
    `kd run` processes; tests/test_interrupts.py's two-runs test is the one that met it.)"""
    from concurrent.futures import ThreadPoolExecutor

    stages = list(_graph().values())
    analyzers = [Analyzer() for _ in range(8)]  # fresh caches: every thread parses every module

    def fingerprints(analyzer):
        return [code_fingerprint(stage.fn, analyzer) for stage in stages]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(fingerprints, analyzers))
    assert all(result == results[0] for result in results)
    assert results[0] == [code_fingerprint(stage.fn) for stage in stages]
