"""Run by test_trainer under one process or ``torch.distributed.run``: writes per-step losses."""

import json
import sys
from pathlib import Path

import torch
from conftest import data_dir, tiny_bert
from test_trainer import _objective

from kd_core.config import StudentConfig, TrainConfig
from kd_core.data.corpus import iter_documents, pack_token_blocks
from kd_core.models.registry import load_tokenizer
from kd_core.models.student import build_student
from kd_core.train.trainer import DistillTrainer


class Recorder:
    def __init__(self):
        self.losses = []

    def on_step_end(self, step, metrics):
        self.losses.append(metrics["loss"])


def main(out: str, per_device_batch: int) -> None:
    tokenizer = load_tokenizer("minilm-l6")
    docs = iter_documents(data_dir() / "wikipedia_sample" / "AA" / "wiki_01")
    blocks = [b for b in pack_token_blocks(tokenizer, docs, 32, 200) if len(b["input_ids"]) == 32][:32]
    teacher = tiny_bert()
    torch.manual_seed(1)
    student = build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, num_heads=4, dropout=0.0))
    cfg = TrainConfig(max_steps=4, batch_size=per_device_batch, learning_rate=1e-3, warmup_ratio=0.0, seed=5)
    recorder = Recorder()
    trainer = DistillTrainer(teacher, student, _objective(), examples=blocks, config=cfg,
                             output_dir=Path(out).parent / f"run{per_device_batch}", pad_token_id=0, callbacks=[recorder])
    trainer.train()
    if trainer.accelerator.is_main_process:
        checksum = sum(p.double().abs().sum().item() for p in trainer.unwrapped.parameters())
        Path(out).write_text(
            json.dumps({"losses": recorder.losses, "world_size": trainer.accelerator.num_processes, "weight_checksum": checksum})
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
