"""Learned step sizes: the Lp loss, the loop, direct LSQ and MoDiff's residual calibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modiff.quant import ActQuant, QuantConfig, QuantSpec, quantize
from modiff.quant.ptq.data import CalibData, CalibDataConfig
from modiff.quant.ptq.calibrate import observe_activations, step_size_summary
from modiff.quant.ptq.lsq import ActCalibConfig, learn_residual_step_sizes, residual_pairs
from modiff.quant.ptq.reconstruct import lp_loss, learn_step_sizes, reconstruct_weights, reconstruction_units
from modiff.quant.ptq.optimize import cosine_lr, draw_rows


def test_published_defaults() -> None:
    c = ActCalibConfig()
    assert (c.iters, c.batch_size, c.lr, c.p, c.learn) == (5_000, 32, 4e-4, 2.4, True)


def test_lp_loss_hand_value() -> None:
    """Sum over channels of |diff|^p, mean over the rest: rows (1, -2) and (3, 0) give (5 + 9) / 2."""
    pred = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    assert float(lp_loss(pred, torch.zeros(2, 2), 2.0)) == 7.0
    assert float(lp_loss(pred, torch.zeros(()), 1.0)) == 3.0


def test_cosine_lr_and_rows() -> None:
    assert cosine_lr(0, 100, 4e-4) == pytest.approx(4e-4) and cosine_lr(50, 100, 4e-4) == pytest.approx(2e-4)
    rows = draw_rows(10, iters=300, batch_size=4, device=torch.device("cpu"), seed=1, chunk=64)
    assert rows.shape == (300, 4) and int(rows.min()) >= 0 and int(rows.max()) <= 9
    assert all(len(set(r.tolist())) == 4 for r in rows)  # without replacement within a batch
    assert torch.equal(rows, draw_rows(10, 300, 4, torch.device("cpu"), seed=1, chunk=64))
    assert draw_rows(3, 2, 8, torch.device("cpu"), seed=0).shape == (2, 3)  # batch capped at N


class _OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _heavy_tailed(n: int = 64) -> CalibData:
    """Inputs and residuals with rare outliers (a min-max start wastes the grid on them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 5, 5, generator=gen)
    x[::16, 0, 0, 0] = 40.0
    before = x + 0.3 * torch.randn(n, 4, 5, 5, generator=gen)
    before[::16, 1, 1, 1] -= 3.0  # residual outliers of about 10 sigma
    zeros = torch.zeros(n, dtype=torch.long)
    return CalibData(x=x, t=zeros, x_before=before, t_before=zeros + 1, index=zeros + 1,
                     config=CalibDataConfig(steps=2, calib_steps=1, samples_per_step=n))


def _loss(qmodel: nn.Module, fp: nn.Module, data: CalibData, p: float) -> float:
    with torch.no_grad():
        return float(lp_loss(qmodel(data.x, data.t), fp(data.x, data.t), p))


def test_learned_step_sizes_lower_the_lp_loss() -> None:
    torch.manual_seed(0)
    fp, data = _OneConv().eval(), _heavy_tailed()
    static = ActQuant(QuantSpec(bits=4, granularity="tensor"), dynamic=False, observer="minmax")
    qmodel = quantize(fp, QuantConfig(weight=None, activation=static))
    observe_activations(qmodel, data)
    start_scale = qmodel.conv.act.scales[0].clone()
    before = _loss(qmodel, fp, data, 2.4)
    config = ActCalibConfig(iters=300, batch_size=16, lr=2e-2, log_every=100, storage_dtype="float32")
    records = learn_step_sizes(qmodel, fp, data, reconstruction_units(qmodel, data), config, progress=False)
    after = _loss(qmodel, fp, data, 2.4)
    assert after < 0.7 * before, (before, after)
    assert float(qmodel.conv.act.scales[0]) < float(start_scale)  # the outliers get clipped
    assert not qmodel.conv.act.scales[0].requires_grad and records[0]["unit"] == "conv"
    # the record's losses over every calibration input are the model's (one unit: the conv) before and after
    assert records[0]["loss_start"] == pytest.approx(before, rel=1e-5)
    assert records[0]["loss_learned"] == pytest.approx(after, rel=1e-5)
    assert step_size_summary(records) == {"units": 1, "units_lowered": 1,
                                          "median_loss_ratio": pytest.approx(after / before, rel=1e-5)}


def test_step_size_summary_by_hand() -> None:
    records = [{"loss_start": 2.0, "loss_learned": 1.0}, {"loss_start": 1.0, "loss_learned": 1.5},
               {"loss_start": 4.0, "loss_learned": 1.0}, {"unit": "not learned"}]
    assert step_size_summary(records) == {"units": 3, "units_lowered": 2, "median_loss_ratio": 0.5}
    assert step_size_summary([{"unit": "not learned"}]) == {}


def _modulated(scheme: str, learn_config: ActCalibConfig) -> tuple[nn.Module, nn.Module, CalibData, list[dict]]:
    torch.manual_seed(0)
    fp, data = _OneConv().eval(), _heavy_tailed()
    static = ActQuant(QuantSpec(bits=4, scheme=scheme, granularity="tensor"), dynamic=False, observer="minmax")
    mq = quantize(fp, QuantConfig(weight=None, activation=static, mode="modulated"))
    units = reconstruction_units(quantize(fp, QuantConfig(weight=None, activation=None)), data)
    records = learn_residual_step_sizes(mq, fp, data, units, learn_config, progress=False)
    return mq, fp, data, records


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_residual_min_max_start(scheme: str) -> None:
    """Symmetric: s = absmax(r) / 7; asymmetric: s = (max - min) / 15 with z = round(-min / s)."""
    mq, fp, data, records = _modulated(scheme, ActCalibConfig(learn=False))
    r = data.x - data.x_before  # conv input residuals (the conv is the first layer)
    if scheme == "symmetric":
        expected_scale, expected_zero = r.abs().max() / 7, 0.0
    else:
        expected_scale = (r.max() - r.min()) / 15
        expected_zero = float(torch.round(-r.min() / expected_scale))
        assert 0 < expected_zero < 15  # a real zero point (the published start keeps a stale one)
    assert float(mq.conv.act.scales[0]) == pytest.approx(float(expected_scale), rel=1e-3)  # r stored in float16
    assert float(mq.conv.act.zero_points[0]) == expected_zero


def test_residual_step_sizes_lower_the_loss() -> None:
    """The layer runs on the previous input (warm-up) then the current one: loss vs A(a_t) + b goes down."""
    start, fp, data, unlearned = _modulated("symmetric", ActCalibConfig(learn=False, storage_dtype="float32"))
    learned, _, _, (record,) = _modulated("symmetric", ActCalibConfig(iters=300, batch_size=16, lr=2e-2, log_every=100,
                                                                      storage_dtype="float32"))
    r, base = residual_pairs(start.conv, fp.conv, data.x, data.x_before, torch.float32)

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            out = base + model.conv.op(model.conv.act(r), model.conv.weight_q, None)
            return float(lp_loss(out, torch.zeros(()), 2.4))

    with torch.no_grad():  # base + A(r) = A(a_before) - A(a_t) + A(a_t - a_before) = 0 for exact residuals
        torch.testing.assert_close(base + fp.conv(r) - fp.conv.bias.view(1, -1, 1, 1), torch.zeros_like(base),
                                   atol=1e-4, rtol=0)
    assert loss(learned) < 0.8 * loss(start), (loss(start), loss(learned))
    assert record["loss_start"] == pytest.approx(loss(start), rel=1e-5)  # over every calibration input
    assert record["loss_learned"] == pytest.approx(loss(learned), rel=1e-5)
    assert "loss_start" not in unlearned[0] and step_size_summary(unlearned) == {}


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="lr and p must be > 0"):
        ActCalibConfig(p=0)
    with pytest.raises(ValueError, match="storage_dtype must be"):
        ActCalibConfig(storage_dtype="int8")


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_graph_replay_trains_on_a_device_that_is_not_current() -> None:
    """A captured step on the last GPU (cuda:1 while the current device is 0, as in a parallel worker)
    must train exactly like the eager loop: an empty capture would leave the weight at its warm-up value."""
    from modiff.quant.ptq.optimize import LoopConfig, make_adam, run_loop

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    data = torch.randn(64, 4, device=device)
    target = data @ torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)

    def train(graphs: bool) -> torch.Tensor:
        weight = torch.zeros(4, device=device, requires_grad=True)
        config = LoopConfig(iters=200, batch_size=16, cuda_graphs=graphs)
        optimizer, _ = make_adam([weight], 0.05, device, config)

        def step(batch):
            loss = ((batch[0] @ weight - batch[1]) ** 2).mean()
            loss.backward()
            optimizer.step()
            return loss

        run_loop(step, [data, target], config, params=[weight])
        return weight.detach()

    eager, graphed = train(False), train(True)
    assert graphed.abs().sum() > 1.0  # it moved well past the three eager warm-up steps
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)


class _ThreeConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _grouped_calibration(budget: int) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """Residual step sizes of a three-unit model with ``capture_budget=budget``: scales, records, fp forwards."""
    torch.manual_seed(0)
    fp, data = _ThreeConvs().eval(), _heavy_tailed()
    static = ActQuant(QuantSpec(bits=4, granularity="tensor"), dynamic=False, observer="minmax")
    mq = quantize(fp, QuantConfig(weight=None, activation=static, mode="modulated"))
    units = reconstruction_units(quantize(fp, QuantConfig(weight=None, activation=None)), data)
    calls = _counted_fp(fp)
    config = ActCalibConfig(iters=40, batch_size=16, lr=2e-2, log_every=20, storage_dtype="float32")
    records = learn_residual_step_sizes(mq, fp, data, units, config, capture_batch=32, progress=False,
                                        capture_budget=budget)
    scales = {name: getattr(mq, name).act.scales[0].clone() for name in ("a", "b", "c")}
    return scales, [{k: v for k, v in r.items() if k != "seconds"} for r in records], len(calls)


def test_one_capture_pass_for_many_units_calibrates_as_one_per_unit() -> None:
    """The block inputs are full-precision activations: gathered for all units in one pair of passes (the default
    budget) or unit by unit (budget 0), the scales and records are the same; only the passes differ."""
    per_unit, per_unit_records, per_unit_calls = _grouped_calibration(0)
    grouped, grouped_records, grouped_calls = _grouped_calibration(2**30)
    assert all(torch.equal(per_unit[name], grouped[name]) for name in per_unit)
    assert grouped_records == per_unit_records and len(grouped_records) == 3
    assert per_unit_calls == 1 + 3 * 2 * 2 and grouped_calls == 1 + 2 * 2  # a probe, then 2 batches x (now, before)


class _Reuses(nn.Module):
    """`b` calls `a`'s convolution again after its own: a capture stopped after `b` sees `a.conv` twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Conv2d(4, 4, 1)), nn.Sequential(nn.Conv2d(4, 4, 1))
        self.b.add_module("again", self.a[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_layer_called_again_within_a_group_falls_back_to_one_pass_per_unit() -> None:
    from types import SimpleNamespace

    from modiff.quant.ptq.lsq import _residual_inputs
    from modiff.quant.ptq.reconstruct import Unit

    torch.manual_seed(0)
    model, data = _Reuses().eval(), _heavy_tailed()
    pending = [(Unit("a", ("a.0",)), [SimpleNamespace(name="a.0")]), (Unit("b", ("b.0",)), [SimpleNamespace(name="b.0")])]
    grouped = list(_residual_inputs(model, data, pending, 32, torch.float32, 2**30))
    per_unit = list(_residual_inputs(model, data, pending, 32, torch.float32, 0))
    assert [a_t.shape[0] for unit in grouped for a_t, _ in unit] == [64, 64]
    assert all(torch.equal(g, p) for gu, pu in zip(grouped, per_unit) for gl, pl in zip(gu, pu) for g, p in zip(gl, pl))


def _counted_fp(model: nn.Module) -> list[int]:
    """Forward calls of ``model`` itself (a quantized deep copy carries the hook along and is not counted)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1) if module is model else None)
    return calls


def _adaround_and_step_sizes(budget: int) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """AdaRound, then direct learned step sizes, of the three-unit model with ``capture_budget=budget``: weight
    codes and scales, records, and the full-precision model's forward calls."""
    from modiff.quant import WeightQuant
    from modiff.quant.ptq.adaround import AdaRoundConfig

    torch.manual_seed(0)
    fp, data = _ThreeConvs().eval(), _heavy_tailed()
    weights = WeightQuant(QuantSpec(bits=3, granularity="channel", channel_axis=0))
    static = ActQuant(QuantSpec(bits=4, granularity="tensor"), dynamic=False, observer="minmax")
    wq = quantize(fp, QuantConfig(weight=weights, activation=None))
    units = reconstruction_units(wq, data)
    calls = _counted_fp(fp)
    adaround = AdaRoundConfig(iters=20, batch_size=16, lr=1e-2, init="minmax", log_every=10, storage_dtype="float32")
    records = reconstruct_weights(wq, fp, data, units, adaround, capture_batch=32, progress=False, capture_budget=budget)
    qmodel = quantize(fp, QuantConfig(weight=weights, activation=static))
    for name in ("a", "b", "c"):
        source = getattr(wq, name)
        getattr(qmodel, name).set_weight_codes(source.weight_codes(), source.weight_scale, source.weight_zero_point)
    observe_activations(qmodel, data)
    steps = ActCalibConfig(iters=20, batch_size=16, lr=2e-2, log_every=10, storage_dtype="float32")
    records += learn_step_sizes(qmodel, fp, data, units, steps, capture_batch=32, progress=False, capture_budget=budget)
    state = {f"{name}.{what}": value for name in ("a", "b", "c")
             for what, value in (("codes", getattr(qmodel, name).weight_codes()), ("scale", getattr(qmodel, name).act.scales[0]))}
    return state, [{k: v for k, v in r.items() if k != "seconds"} for r in records], len(calls)


def test_full_precision_targets_captured_for_many_units_calibrate_as_one_per_unit() -> None:
    """AdaRound's and the direct step sizes' targets are the full-precision model's: one pass for the three units
    (the default budget) or one per unit (budget 0) gives the same codes, scales and records."""
    per_unit, per_unit_records, per_unit_calls = _adaround_and_step_sizes(0)
    grouped, grouped_records, grouped_calls = _adaround_and_step_sizes(2**30)
    assert per_unit.keys() == grouped.keys() and all(torch.equal(per_unit[k], grouped[k]) for k in per_unit)
    assert grouped_records == per_unit_records and len(grouped_records) == 6
    # per phase: a probe, then 2 batches per pass; one pass per unit, or one for all three
    assert per_unit_calls == 2 * (1 + 3 * 2) and grouped_calls == 2 * (1 + 2)
