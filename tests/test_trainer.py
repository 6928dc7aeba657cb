import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from kd_core.config import LayerMapping, StudentConfig, TrainConfig
from kd_core.models.student import build_student
from kd_core.stop import STOP_REQUESTED
from kd_core.train.data import DataPosition, GlobalBatchPlan
from kd_core.train.objective import ModelShape, Objective, expand_recipe
from kd_core.train.trainer import CheckpointMismatchError, DistillTrainer, NonFiniteLossError, TrainingInterrupted

HERE = Path(__file__).resolve().parent


def _student(teacher, seed=1, dropout=0.1):
    torch.manual_seed(seed)
    return build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, num_heads=4, dropout=dropout))


def _objective(recipe="tinybert_intermediate", s_layers=2, s_hidden=32, t_layers=4, t_hidden=64, heads=4, seed=2):
    torch.manual_seed(seed)
    specs = expand_recipe(recipe, LayerMapping(), s_layers, t_layers, params={"num_relation_heads": 4})
    return Objective(specs, ModelShape(s_layers, s_hidden, heads), ModelShape(t_layers, t_hidden, heads))


def _train_cfg(**kw):
    base = dict(max_steps=8, batch_size=4, grad_accum_steps=2, learning_rate=1e-3, warmup_ratio=0.25, log_every=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_global_batches_are_shared_across_ranks_and_epochs():
    single = GlobalBatchPlan(20, batch_size=4, grad_accum_steps=1, world_size=1, seed=3)
    two = GlobalBatchPlan(20, batch_size=2, grad_accum_steps=1, world_size=2, seed=3)
    (whole,), nxt = single.micro_batches(DataPosition(), 0)
    (r0,), _ = two.micro_batches(DataPosition(), 0)
    (r1,), _ = two.micro_batches(DataPosition(), 1)
    assert list(whole) == list(r0) + list(r1)
    assert nxt == DataPosition(0, 4)
    # 20 examples, global batch 4: the 6th step starts epoch 1 with a new order
    (late,), pos = single.micro_batches(DataPosition(0, 20), 0)
    assert pos == DataPosition(1, 4) and sorted(late) != sorted(whole) or list(late) != list(whole)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchPlan(3, 4, 1, 1, 0)


def test_resume_is_exact(tmp_path, wiki_blocks):
    """2N steps in one go == N steps, stop, resume with fresh objects, N more (to 1e-6)."""
    teacher = tiny_bert()
    cfg = _train_cfg()

    straight = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=cfg, output_dir=tmp_path / "a",
                              pad_token_id=0)
    straight.train()
    expected = {k: v.clone() for k, v in straight.unwrapped.state_dict().items()}

    first = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=cfg, output_dir=tmp_path / "b",
                           pad_token_id=0)
    first.train(until_step=4)
    assert (tmp_path / "b" / "checkpoints" / "step-0000004" / "trainer_state.pt").is_file()
    # Different initial weights prove the checkpoint, not the seed, supplies the state.
    resumed = DistillTrainer(
        teacher, _student(teacher, seed=99), _objective(seed=98), examples=wiki_blocks, config=cfg,
        output_dir=tmp_path / "b", pad_token_id=0
    )
    result = resumed.train()
    assert result.resumed_from == 4 and result.steps == 8
    got = resumed.unwrapped.state_dict()
    assert set(got) == set(expected)
    worst = max((got[k].double() - expected[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    # and training really moved the weights
    moved = max((expected[k] - first.unwrapped.state_dict()[k]).abs().max().item() for k in expected)
    assert moved > 1e-4


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path, wiki_blocks):
    teacher = tiny_bert()
    DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=_train_cfg(), output_dir=tmp_path,
                   pad_token_id=0).train(until_step=2)
    other = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=_train_cfg(learning_rate=5e-4),
                           output_dir=tmp_path, pad_token_id=0)
    with pytest.raises(CheckpointMismatchError, match="different config"):
        other.train()


def test_checkpoints_are_pruned_and_staging_never_counts(tmp_path, wiki_blocks):
    teacher = tiny_bert()
    trainer = DistillTrainer(
        teacher, _student(teacher), _objective(), examples=wiki_blocks, config=_train_cfg(checkpoint_every=2, keep_checkpoints=2),
        output_dir=tmp_path, pad_token_id=0,
    )
    (tmp_path / "checkpoints" / ".staging-step-0000099").mkdir(parents=True)
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000006", "step-0000008"]
    assert trainer.latest_checkpoint().name == "step-0000008"


@pytest.mark.parametrize("recipe", ["tinybert_intermediate", "minilm", "minilmv2", "distilbert"])
def test_every_loss_is_zero_when_student_equals_teacher(recipe, wiki_blocks):
    from kd_core.models.adaptors import ModelAdaptor

    teacher = tiny_bert(layers=2, hidden=32, head="sequence_classification", num_labels=3)
    student = copy.deepcopy(teacher)
    objective = _objective(recipe, 2, 32, 2, 32)
    for proj in objective.projections.values():  # identity projections make student == teacher exactly
        with torch.no_grad():
            proj.weight.copy_(torch.eye(32))
            proj.bias.zero_()
    batch = {k: torch.tensor([b["input_ids"] for b in wiki_blocks[:3]]) for k in ["input_ids"]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, 20:] = 0
    s_out, t_out = ModelAdaptor(student)(**batch), ModelAdaptor(teacher)(**batch)
    total, terms = objective(s_out, t_out)
    assert len(terms) >= 2
    for name, value in terms.items():
        assert abs(value.item()) < 1e-6, (name, value.item())
    assert abs(total.item()) < 1e-6


def test_prediction_soft_ce_has_zero_gradient_at_the_teacher(wiki_blocks):
    from kd_core.models.adaptors import ModelAdaptor

    teacher = tiny_bert(layers=2, hidden=32, head="sequence_classification", num_labels=3)
    objective = _objective("tinybert_prediction", 2, 32, 2, 32)
    batch = {"input_ids": torch.tensor([b["input_ids"] for b in wiki_blocks[:3]])}
    t_out = ModelAdaptor(teacher)(**batch)
    s_logits = t_out.logits.detach().clone().requires_grad_(True)

    class _Out:
        attention_mask = None
        logits = s_logits

        def feature(self, name, layer=None):
            return s_logits

    total, _ = objective(_Out(), t_out)
    probs = torch.softmax(t_out.logits, -1)
    entropy = -(probs * torch.log(probs)).sum(-1).mean()
    assert total.item() == pytest.approx(entropy.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(total, s_logits)
    assert grad.abs().max().item() < 1e-7


def test_gradients_reach_the_projections_and_they_are_saved(tmp_path, wiki_blocks):
    from transformers import AutoModel

    from kd_core.train.trainer import load_projections

    teacher = tiny_bert()
    trainer = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=_train_cfg(max_steps=2),
                             output_dir=tmp_path, pad_token_id=0)
    before = {k: v.clone() for k, v in trainer.projections.state_dict().items()}
    trainer.train()
    for key, value in trainer.projections.state_dict().items():
        assert (value - before[key]).abs().max() > 0, key
    out = trainer.save_student(tmp_path / "student")
    saved = load_projections(out)
    assert set(saved) == {"W_e.weight", "W_e.bias", "W_h.weight", "W_h.bias"}
    assert torch.equal(saved["W_h.weight"], trainer.projections["W_h"].weight.detach())
    reloaded = AutoModel.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 32
    assert json.loads((out / "distillation.json").read_text())["step"] == 2


def test_non_finite_loss_aborts_with_the_step(tmp_path, wiki_blocks):
    teacher = tiny_bert()
    student = _student(teacher)
    trainer = DistillTrainer(teacher, student, _objective(), examples=wiki_blocks, config=_train_cfg(), output_dir=tmp_path, pad_token_id=0)
    trainer.train(until_step=2)
    with torch.no_grad():
        trainer.student.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.train(resume=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    """Same global batch: 2 gloo processes × 2 examples == 1 process × 4 examples."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}", "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(single), "4"], check=True, env=env, timeout=300)
    ddp = tmp_path / "ddp.json"
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(ddp), "2",
        ],
        check=True,
        env=env,
        timeout=300,
    )
    a, b = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert len(a["losses"]) == len(b["losses"]) == 4
    for la, lb in zip(a["losses"], b["losses"]):
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert a["losses"][0] != a["losses"][-1]
    assert b["weight_checksum"] == pytest.approx(a["weight_checksum"], rel=1e-5)


@pytest.mark.slow
def test_intermediate_loss_falls_with_the_real_teacher(tmp_path, tokenizer, kd_data_dir):
    """The real minilm-l6 teacher on real Wikipedia: TinyBERT's intermediate loss goes down."""
    from kd_core.config import DistillConfig
    from kd_core.data.corpus import iter_documents, pack_token_blocks
    from kd_core.models.registry import load_model
    from kd_core.train.distill import build_objective

    teacher = load_model("minilm-l6")
    cfg = DistillConfig.model_validate({"student": {"num_layers": 2, "hidden_size": 96}})
    torch.manual_seed(0)
    student = build_student(teacher, cfg.student)
    blocks = list(pack_token_blocks(tokenizer, iter_documents(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_03"), 48, 96))
    train = TrainConfig(max_steps=12, batch_size=8, learning_rate=1e-3, warmup_ratio=0.1, log_every=1)
    result = DistillTrainer(teacher, student, build_objective(cfg, teacher, student), examples=blocks, config=train, output_dir=tmp_path,
                            pad_token_id=0).train()
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses


class _StopAt:
    """Requests a stop the way the SIGINT/SIGTERM handler does, after ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step, metrics):
        if step == self.step:
            STOP_REQUESTED.set()


def test_a_requested_stop_checkpoints_and_the_resume_equals_an_uninterrupted_run(tmp_path, wiki_blocks):
    teacher = tiny_bert()
    cfg = _train_cfg(log_every=3)  # the stop (step 5) falls between logged steps 3 and 6
    straight = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=cfg, output_dir=tmp_path / "a",
                              pad_token_id=0).train()

    stopped = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=cfg, output_dir=tmp_path / "b",
                             pad_token_id=0,
                             callbacks=[_StopAt(5)])
    try:
        with pytest.raises(TrainingInterrupted, match="stopped at step 5") as raised:
            stopped.train()
    finally:
        STOP_REQUESTED.clear()
    assert raised.value.step == 5 and raised.value.checkpoint.name == "step-0000005"
    resumed = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks, config=cfg, output_dir=tmp_path / "b",
                             pad_token_id=0).train()
    assert resumed.resumed_from == 5 and resumed.steps == 8
    # the history is the uninterrupted run's: logged steps 3, 6 and the last, with the same losses
    assert [row["step"] for row in straight.history] == [3, 6, 8]
    assert resumed.history == straight.history


def test_named_events_fire_in_order_and_epoch_metrics_join_their_step(tmp_path, wiki_blocks):
    """20 examples, global batch 8 (4 x 2 accumulation), the ragged tail of 4 dropped: two steps
    an epoch, so epochs begin before steps 1, 3, 5 and 7."""
    events = []

    class Recorder:
        def on_train_begin(self, first, last, global_batch):
            events.append(("train_begin", first, last, global_batch))

        def on_epoch_begin(self, trainer, epoch):
            events.append(("epoch_begin", trainer.step + 1, epoch))
            return {"epoch_marker": float(epoch)}

        def on_step_end(self, step, metrics):
            events.append(("step_end", step))

    teacher = tiny_bert()
    trainer = DistillTrainer(teacher, _student(teacher), _objective(), examples=wiki_blocks[:20], config=_train_cfg(),
                             output_dir=tmp_path, pad_token_id=0, callbacks=[Recorder()])
    expected_starts = [1, 3, 5, 7]
    result = trainer.train()
    assert events[0] == ("train_begin", 0, 8, 8)
    assert [e[1:] for e in events if e[0] == "epoch_begin"] == [(1, 0), (3, 1), (5, 2), (7, 3)]
    assert [e[1] for e in events if e[0] == "step_end"] == list(range(1, 9))
    marked = {row["step"]: row.get("epoch_marker") for row in result.history}
    assert [s for s, v in marked.items() if v is not None] == expected_starts
