"""``lipverify.fast``: a frozen module computing the model's eval function (issue 18).

Oracles: the model's own eval-mode forward and, for SOC, its plain implementation
(``SOC.reference_forward``: one convolution per Taylor power, plain autograd). Logits and input
gradients are compared to 1e-5 (relative to max(1, largest entry)).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lipverify
import lipverify.fast as fast_mod
from lipverify.default import load_default_model
from lipverify.errors import CheckpointError, InputError
from lipverify.fast import FastModule, load, save
from lipverify.layers.soc import SOC
from lipverify.models import LipConvNet

TOL = 1e-5


def images(n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits_and_grad(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the input gradient of a loss that weights every logit differently."""
    xx = x.clone().requires_grad_(True)
    out = f(xx)
    w = torch.linspace(-1.0, 2.0, out.shape[1])
    (g,) = torch.autograd.grad((out * w).sum() + out.logsumexp(1).sum(), xx)
    return out.detach(), g


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL} x {scale:.3g}"


def assert_same_function(module: FastModule, model: torch.nn.Module, x: torch.Tensor,
                         monkeypatch) -> None:
    got = logits_and_grad(module, x)
    has_soc = any(isinstance(m, SOC) for m in model.modules())
    for oracle in ("model", "plain") if has_soc else ("model",):
        with monkeypatch.context() as mp:
            if oracle == "plain":
                mp.setattr(SOC, "forward", SOC.reference_forward)
            ref = logits_and_grad(model, x)
        assert_close(got[0], ref[0], f"logits vs {oracle}")
        assert_close(got[1], ref[1], f"input gradient vs {oracle}")


@pytest.fixture(scope="module")
def default_model() -> torch.nn.Module:
    return load_default_model()


@pytest.fixture(scope="module")
def default_fast(default_model) -> FastModule:
    return lipverify.fast(default_model)


def test_default_model_same_logits_and_input_gradients(default_model, default_fast,
                                                      monkeypatch) -> None:
    ops = {r["name"]: r["op"] for r in default_fast.layers}
    assert ops["layer2.0.conv"] == "soc_dense" and ops["layer1.0.conv"] == "soc_series"
    assert_same_function(default_fast, default_model, images(), monkeypatch)
    assert default_fast.probe_error <= TOL
    assert default_fast.build_seconds > 0
    assert default_fast.nbytes == sum(b.numel() * b.element_size()
                                      for b in default_fast.buffers())
    assert "built in" in default_fast.summary()


def small(conv: str, activation: str, last: str, seed: int = 5) -> LipConvNet:
    """A LipConvNet-5 of width 4 with non-trivial biases and angles, in train mode."""
    torch.manual_seed(seed)
    model = LipConvNet(conv=conv, activation=activation, num_layers=5, init_channels=4,
                       last_layer=last)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "theta" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("conv,activation,last", [
    ("cayley", "maxmin", "ortho"),  # CayleyLinear last layer
    ("cayley", "hh1", "lln"),
    ("bcop", "hh2", "lln"),
    ("bcop", "maxmin", "ortho"),  # BCOP 1x1 last layer
    ("soc", "hh2", "ortho"),  # SOC 1x1 last layer
])
def test_lipconvnets_with_cayley_bcop_and_soc_layers(conv, activation, last, monkeypatch) -> None:
    model = small(conv, activation, last)
    module = lipverify.fast(model)
    kinds = {r["op"] for r in module.layers}
    expected = {"cayley": "cayley_conv", "bcop": "bcop_conv", "soc": "soc_dense"}[conv]
    assert expected in kinds and "activation" in kinds
    assert model.training  # the model's own mode is left as it was
    model.eval()
    assert_same_function(module, model, images(4), monkeypatch)


@pytest.mark.parametrize("dense", [True, False, ["layer3.0.conv"]])
def test_every_soc_layer_dense_or_series(dense, monkeypatch) -> None:
    model = small("soc", "maxmin", "lln").eval()
    module = lipverify.fast(model, dense=dense)
    ops = {r["name"]: r["op"] for r in module.layers if r["name"].endswith("conv")}
    assert len(ops) == 5
    for name, op in ops.items():
        want = dense if isinstance(dense, bool) else name in dense
        assert op == ("soc_dense" if want else "soc_series"), name
    assert_same_function(module, model, images(3), monkeypatch)


def test_frozen_eval_mode_without_parameters(default_fast) -> None:
    assert list(default_fast.parameters()) == []
    assert not any(b.requires_grad for b in default_fast.buffers())
    assert not default_fast.training
    default_fast.train()
    assert not any(m.training for m in default_fast.modules())
    # the state is the operators: no cache or other tensor outside the state dict
    state = default_fast.state_dict()
    assert {k for k in state if k != "_extra_state"} == {n for n, _ in
                                                         default_fast.named_buffers()}


def test_state_dict_round_trip_with_weights_only(default_fast, tmp_path) -> None:
    x = images(4)
    with torch.no_grad():
        ref = default_fast(x)
    path = tmp_path / "fast.pt"
    torch.save(default_fast.state_dict(), path)
    state = torch.load(path, weights_only=True)
    rebuilt = FastModule.from_state_dict(state)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ref)
    assert rebuilt.input_shape == default_fast.input_shape
    assert rebuilt.build_seconds == default_fast.build_seconds
    # save/load helpers (atomic write, weights_only read, probe re-checked)
    save(default_fast, tmp_path / "f2.pt")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "f2.pt")(x), ref)
    # load_state_dict into a module of the same structure
    rebuilt.load_state_dict(default_fast.state_dict())


def test_damaged_state_is_refused(default_fast, tmp_path) -> None:
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
             for k, v in default_fast.state_dict().items()}
    key = next(k for k in state if k.endswith("matrix"))
    state[key][0, 0] += 1.0
    with pytest.raises(InputError, match="does not reproduce its recorded probe"):
        FastModule.from_state_dict(state)
    del state[key]
    with pytest.raises(InputError, match="needs tensors"):
        FastModule.from_state_dict(state)
    with pytest.raises(InputError, match="not the state"):
        FastModule.from_state_dict({"weight": torch.zeros(1)})
    # a crafted description may not ask for unbounded work (here 1e9 Taylor terms)
    state = dict(default_fast.state_dict())
    spec = json.loads(state["_extra_state"]["spec"])
    next(s for s in spec["ops"] if s["op"] == "soc_series")["terms"] = 10**9
    state["_extra_state"] = {**state["_extra_state"], "spec": json.dumps(spec)}
    with pytest.raises(InputError, match="unreadable description"):
        FastModule.from_state_dict(state)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load(tmp_path / "junk.pt")


def test_refuses_when_an_operator_would_not_fit(default_model, monkeypatch) -> None:
    def never(*a, **k):
        raise AssertionError("built an operator before checking the budget")

    monkeypatch.setattr(fast_mod, "build_dense", never)
    with pytest.raises(InputError, match=r"would not fit.*layer2\.0\.conv.*max_bytes"):
        lipverify.fast(default_model, max_bytes=8 << 20)
    # all SOC layers kept as series fits in the same budget
    monkeypatch.undo()
    module = lipverify.fast(default_model, max_bytes=8 << 20, dense=False)
    assert module.nbytes <= 8 << 20


def test_a_wrong_operator_is_caught_by_the_build_check(default_model, monkeypatch) -> None:
    real = fast_mod.build_dense
    monkeypatch.setattr(fast_mod, "build_dense", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(InputError, match="differs from the model"):
        lipverify.fast(default_model, dense=["layer5.0.conv"])


def test_bad_inputs_and_models_get_one_line_errors(default_fast) -> None:
    for x in (torch.rand(2, 3, 16, 16), torch.rand(3, 32, 32), torch.rand(2, 3, 32, 32).double()):
        with pytest.raises(InputError) as e:
            default_fast(x)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="builds LipConvNet"):
        lipverify.fast(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    with pytest.raises(InputError, match="input_size"):
        lipverify.fast(load_default_model(), input_size=(1, 2, 3, 4))


def test_lipverify_fast_is_the_callable_module_however_it_was_imported(default_model) -> None:
    assert lipverify.fast is fast_mod and lipverify.FastModule is FastModule
    assert isinstance(lipverify.fast(default_model, dense=False), FastModule)
    code = ("import lipverify; f = lipverify.fast; import lipverify.fast as g; "
            "assert f is g and callable(f) and f.load and f.save and lipverify.FastModule")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
