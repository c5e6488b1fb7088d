"""A small RMT-KD run for the kill-and-resume test: `python resume_run.py OUTPUT_DIR [--resume]`.

Prints the final reduction map as JSON on its last line.
"""

import json
import sys

import torch
from test_trainer import accuracy, text_task
from tiny_models import tiny_model
from transformers import Trainer, TrainingArguments

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments


def main(output_dir: str, resume: bool) -> None:
    torch.manual_seed(0)
    model = tiny_model("bert", initializer_range=0.1).train()
    train, test = text_task(512, 0), text_task(256, 1)
    Trainer(model=model, args=TrainingArguments(output_dir=f"{output_dir}/teacher", num_train_epochs=4,
                                                per_device_train_batch_size=32, learning_rate=3e-3, report_to=[],
                                                save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0),
            train_dataset=train).train()
    args = RMTKDTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=3e-3,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, sites_per_round=2, max_rounds=3,
        distillation_epochs_per_round=3, min_rank=2, max_metric_drop=0.2, calibration_fraction=0.25,
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    trainer.train(resume_from_checkpoint=True if resume else None)
    weights = float(sum(p.detach().double().abs().sum() for p in trainer.model.parameters()))
    print(json.dumps({"reductions": trainer.model.config.reductions, "weights": weights}))


if __name__ == "__main__":
    main(sys.argv[1], "--resume" in sys.argv)
