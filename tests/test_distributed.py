"""Two CPU processes (gloo) through `accelerate.debug_launcher`: sums, plans and weights agree across processes."""

import json
import os

import pytest
import torch
from accelerate import debug_launcher
from test_trainer import accuracy, text_task
from tiny_models import tiny_model

RESULTS = "RMTKD_DISTRIBUTED_RESULTS"


def _run_two_processes():
    from hf_rmtkd.architectures import find_sites
    from hf_rmtkd.calibration import collect_statistics
    from hf_rmtkd.trainer import RMTKDTrainer
    from hf_rmtkd.training_args import RMTKDTrainingArguments

    torch.manual_seed(0)
    model = tiny_model("bert", initializer_range=0.1)
    train, test = text_task(128, 0), text_task(64, 1)
    args = RMTKDTrainingArguments(
        output_dir=os.path.join(os.environ[RESULTS], "run"), per_device_train_batch_size=16,
        per_device_eval_batch_size=16, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        max_rounds=1, sites_per_round=2, distillation_steps_per_round=3, min_rank=2, max_metric_drop=1.0,
        calibration_fraction=0.5, seed=0,
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    accelerator = trainer.accelerator
    sites = find_sites(model)
    # The statistics summed over both processes' shards equal one process reading every calibration batch.
    shared = collect_statistics(model, trainer._calibration_loader(), sites, accelerator=accelerator, progress=False)
    single = collect_statistics(model, trainer.calibration_dataset.remove_columns("labels"), sites, batch_size=16,
                                progress=False)
    errors = []
    for name, acc in shared.accumulators.items():
        reference = single.accumulators[name]
        errors.append(float((acc.covariance() - reference.covariance()).norm() / reference.covariance().norm()))
        assert acc.count == reference.count
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    result = {
        "process": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "max_relative_error": max(errors),
        "reductions": trainer.model.config.reductions,
        "weights_sum": float(weights.double().sum()),
        "weights_head": weights[:64].tolist(),
    }
    with open(os.path.join(os.environ[RESULTS], f"process{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_two_processes_agree(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS, str(tmp_path))
    debug_launcher(_run_two_processes, num_processes=2)
    results = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]
    assert all(r["num_processes"] == 2 for r in results)
    assert all(r["max_relative_error"] < 1e-6 for r in results)
    assert results[0]["reductions"] == results[1]["reductions"] and results[0]["reductions"]
    assert results[0]["weights_sum"] == pytest.approx(results[1]["weights_sum"], rel=1e-6)
    torch.testing.assert_close(torch.tensor(results[0]["weights_head"]), torch.tensor(results[1]["weights_head"]))
