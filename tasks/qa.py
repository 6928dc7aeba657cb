"""Prefect tasks for the SQuAD stages (logic: kd_core.qa_stages; wiring: tasks.qa_dag)."""

from tasks.runtime import stage_task

prepare_qa = stage_task("prepare_qa")
finetune_teacher_qa = stage_task("finetune_teacher_qa")
task_distill_qa_intermediate = stage_task("task_distill_qa_intermediate")
task_distill_qa_prediction = stage_task("task_distill_qa_prediction")
evaluate_qa = stage_task("evaluate_qa")
