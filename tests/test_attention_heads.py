"""The ``attention_heads`` kind: head ranking, exactness, least-squares refit, parameter counts, planning, errors."""

import copy

import pytest
import torch
from tiny_models import module_io, site_statistics, tiny_inputs, tiny_model

from hf_rmtkd.architectures import attention_head_dim, find_sites
from hf_rmtkd.calibration import calibrate
from hf_rmtkd.plan import KINDS, keep_signal_fraction, plan_reductions
from hf_rmtkd.reductions import REDUCTIONS, apply_attention_heads, head_signal, heads_holding
from hf_rmtkd.spectrum import signal_variances

ARCHS = ["bert", "roberta"]  # the BERT family: attention infers its head count from the q/k/v width


def attention(arch: str, layer: int = 0) -> tuple[str, list[str]]:
    """(output projection path, [q, k, v] paths) of one attention block of a tiny ``arch`` classifier."""
    block = f"{arch}.encoder.layer.{layer}.attention"
    return f"{block}.output.dense", [f"{block}.self.{name}" for name in ("query", "key", "value")]


def entry_for(model, arch: str, heads: list[int]) -> tuple[str, dict]:
    consumer, producers = attention(arch)
    head_dim = attention_head_dim(model)
    return consumer, {"kind": "attention_heads", "width": len(heads) * head_dim, "head_dim": head_dim,
                      "producers": producers, "heads": heads}


@pytest.mark.parametrize(
    "mass,fraction,expected",
    [
        ([1.0, 5.0, 3.0, 1.0], 0.5, [1]),  # the largest head alone holds half
        ([1.0, 5.0, 3.0, 1.0], 0.8, [1, 2]),
        ([1.0, 5.0, 3.0, 0.5], 0.9, [0, 1, 2]),
        ([1.0, 5.0, 3.0, 1.0], 1.0, [0, 1, 2, 3]),
        ([1.0, 5.0, 3.0, 0.0], 1.0, [0, 1, 2]),  # a head with no signal is dropped even at fraction 1
        ([1.0, 5.0, 3.0, 1.0], 0.0, [1]),
        ([0.0, 0.0, 0.0], 0.5, [0, 1, 2]),  # nothing to rank by: keep everything
    ],
)
def test_heads_holding_keeps_the_fewest_heads_holding_the_fraction(mass, fraction, expected):
    assert heads_holding(torch.tensor(mass, dtype=torch.float64), fraction) == expected


def test_heads_holding_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="fraction"):
        heads_holding(torch.ones(3), 1.5)


def test_head_signal_sums_each_heads_share_of_every_direction():
    # Direction 0 lies in head 1; direction 1 is split evenly between heads 0 and 2 (head size 2, 3 heads).
    U = torch.zeros(6, 2, dtype=torch.float64)
    U[2, 0] = 1.0
    U[0, 1] = U[5, 1] = 0.5**0.5
    mass = head_signal(U, torch.tensor([4.0, 2.0]), head_dim=2)
    torch.testing.assert_close(mass, torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="whole number of heads"):
        head_signal(U, torch.tensor([4.0, 2.0]), head_dim=4)


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_head_reproduces_the_model(arch):
    model, inputs = tiny_model(arch), tiny_inputs(arch, batch=16)
    before = model(**inputs).logits
    heads = list(range(model.config.num_attention_heads))
    consumer, entry = entry_for(model, arch, heads)
    REDUCTIONS["attention_heads"].apply(model, consumer, entry, **site_statistics(model, consumer, inputs))
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_heads_removes_the_predicted_parameters_and_narrows_q_k_v(arch):
    model, inputs = tiny_model(arch), tiny_inputs(arch, batch=16)
    total = model.num_parameters()
    consumer, entry = entry_for(model, arch, [0, 2])
    predicted = REDUCTIONS["attention_heads"].parameter_savings(model, consumer, entry)
    REDUCTIONS["attention_heads"].apply(model, consumer, entry, **site_statistics(model, consumer, inputs))
    assert predicted > 0 and model.num_parameters() == total - predicted
    for producer in entry["producers"]:
        assert model.get_submodule(producer).out_features == entry["width"]
    assert model.get_submodule(consumer).in_features == entry["width"]
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_heads_are_untouched_and_the_refit_beats_filling_in_the_mean(arch):
    """The kept heads compute what they did; the output projection's least-squares refit on the calibration
    statistics reconstructs its output at least as well as replacing the dropped heads by their mean."""
    model, inputs = tiny_model(arch, initializer_range=0.2), tiny_inputs(arch, batch=32)
    consumer, entry = entry_for(model, arch, [1, 3])
    x, y = module_io(model, consumer, inputs)
    stats = site_statistics(model, consumer, inputs)
    old = copy.deepcopy(model.get_submodule(consumer))
    keep = torch.cat([torch.arange(h * entry["head_dim"], (h + 1) * entry["head_dim"]) for h in entry["heads"]])
    drop = torch.tensor([i for i in range(x.shape[-1]) if i not in set(keep.tolist())])
    mean_fill = x[..., keep] @ old.weight[:, keep].T + old.bias + old.weight[:, drop] @ stats["mean"][drop].float()

    cut = copy.deepcopy(model)
    apply_attention_heads(cut, consumer, entry["producers"], covariance=stats["covariance"], mean=stats["mean"],
                          heads=entry["heads"], head_dim=entry["head_dim"])
    x_cut, y_cut = module_io(cut, consumer, inputs)
    torch.testing.assert_close(x_cut, x[..., keep], atol=1e-5, rtol=0)  # the kept heads' outputs are unchanged

    def error(approx):
        return float((approx - y).detach().pow(2).mean())

    assert error(y_cut) < error(mean_fill)


def test_entry_errors_name_the_module():
    model = tiny_model("bert")
    consumer, entry = entry_for(model, "bert", [0, 1])
    with pytest.raises(ValueError, match=r"attention_heads entry for '.*output\.dense'.*multiple of 'head_dim'"):
        REDUCTIONS["attention_heads"].build(model, consumer, {**entry, "width": entry["width"] + 1})
    stats = site_statistics(model, consumer, tiny_inputs("bert"))
    without_heads = {key: value for key, value in entry.items() if key != "heads"}
    with pytest.raises(ValueError, match=r"output\.dense' needs 'heads'"):
        REDUCTIONS["attention_heads"].apply(model, consumer, without_heads, **stats)
    with pytest.raises(ValueError, match=r"output\.dense.*distinct indices in \[0, 4\)"):
        apply_attention_heads(model, consumer, entry["producers"], covariance=stats["covariance"],
                              mean=stats["mean"], heads=[0, 7], head_dim=entry["head_dim"])


def _measured(arch: str):
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, batch=32, seq_len=16)
    data = [{k: v[i:i + 8] for k, v in inputs.items() if k != "labels"} for i in range(0, 32, 8)]
    base = model.base_model
    return base, calibrate(base, data, progress=False)


def test_planner_drops_heads_only_under_a_signal_fraction_and_only_when_enabled():
    base, measurements = _measured("bert")
    attention_out = [m for m in measurements if m.site.role == "attention_out"]

    def cuts(fraction, kinds):
        plan = plan_reductions(keep_signal_fraction(measurements, fraction), base, kinds=kinds, min_rank=2)
        return {c.site: c for c in plan.cuts if c.role == "attention_out"}

    # The spectrum's own cut keeps every head that carries signal (all of them here): the output is factored.
    assert {c.kind for c in cuts(1.0, KINDS).values()} == {"low_rank"}
    # Under a target, the heads outside those holding the kept fraction are dropped, whole.
    head_dim, n_heads = attention_head_dim(base), base.config.num_attention_heads
    dropped = cuts(0.6, KINDS)
    assert {c.kind for c in dropped.values()} == {"attention_heads"} and len(dropped) == len(attention_out)
    for m in keep_signal_fraction(attention_out, 0.6):
        cut = dropped[m.site.name]
        assert 1 <= len(cut.heads) < n_heads and cut.rank == len(cut.heads) * head_dim
        # The kept heads are those holding the most of the kept outliers' signal.
        mass = head_signal(m.eigenvectors[:, : m.k], signal_variances(m.eigenvalues, m.outliers), head_dim)
        others = [h for h in range(n_heads) if h not in cut.heads]
        assert float(mass[cut.heads].min()) >= float(mass[others].max())
    # Not enabled: factored as before.
    assert {c.kind for c in cuts(0.6, ["ffn_width", "low_rank", "embedding"]).values()} == {"low_rank"}


def test_a_head_fraction_below_the_sites_own_drops_more_heads_and_never_fewer():
    base, measurements = _measured("bert")

    def heads_kept(fraction, head_fraction):
        plan = plan_reductions(keep_signal_fraction(measurements, fraction), base, kinds=KINDS, min_rank=2,
                               head_fraction=head_fraction)
        n_heads = base.config.num_attention_heads
        return {c.site: len(c.heads) if c.kind == "attention_heads" else n_heads
                for c in plan.cuts if c.role == "attention_out"}

    at_own, lower, higher = heads_kept(0.9, None), heads_kept(0.9, 0.3), heads_kept(0.9, 1.0)
    assert higher == at_own  # a head fraction above the site's own changes nothing
    assert lower.keys() == at_own.keys() and all(lower[s] <= at_own[s] for s in at_own)
    assert sum(lower.values()) < sum(at_own.values())
    # Without a target (the spectrum's own cut, fraction 1) heads drop only when a head fraction asks for it.
    assert all(c.kind != "attention_heads" for c in plan_reductions(measurements, base, kinds=KINDS, min_rank=2).cuts)
    assert sum(heads_kept(1.0, 0.3).values()) < len(heads_kept(1.0, 0.3)) * base.config.num_attention_heads
    with pytest.raises(ValueError, match="head_fraction must lie in"):
        plan_reductions(measurements, base, kinds=KINDS, head_fraction=1.2)


@pytest.mark.parametrize("arch", ["distilbert", "llama"])
def test_architectures_whose_attention_fixes_its_head_count_never_drop_heads(arch):
    base, measurements = _measured(arch)
    plan = plan_reductions(keep_signal_fraction(measurements, 0.3), base, kinds=KINDS, min_rank=2)
    assert plan.cuts and all(c.kind != "attention_heads" for c in plan.cuts)
    assert all(not s.producers for s in find_sites(base) if s.role == "attention_out")
