"""Checkpoint round trips and corruption detection; reference-code import."""

from __future__ import annotations

import hashlib

import pytest
import torch

import lipverify
from lipverify.checkpoints import load_model, read_checkpoint
from lipverify.errors import CheckpointError

FIXTURES = [
    "soc-lipconvnet5-hh1-lln-c10.pt",
    "soc-lipconvnet10-maxmin-ortho-c10.pt",
    "soc-lipconvnet5-hh2-lln-c100.pt",
]


def _model() -> lipverify.LipConvNet:
    torch.manual_seed(0)
    return lipverify.LipConvNet(activation="hh2", init_channels=4, last_layer="lln").eval()


def test_save_load_round_trip_gives_identical_logits(tmp_path) -> None:
    m = _model()
    path = lipverify.save_checkpoint(m, tmp_path / "m.pt", note="hello", epoch=3)
    loaded = lipverify.load_checkpoint(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    assert loaded.metadata == {"note": "hello", "epoch": 3}
    assert loaded.config == m.config and not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_flipped_weight_byte_is_detected(tmp_path) -> None:
    path = lipverify.save_checkpoint(_model(), tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    w = _model().layer1[0].conv.random_conv_filter.detach().numpy().tobytes()
    at = bytes(data).find(w[:64])
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        lipverify.load_checkpoint(path)


def test_truncated_and_foreign_files_are_refused(tmp_path) -> None:
    path = lipverify.save_checkpoint(_model(), tmp_path / "m.pt")
    (tmp_path / "t.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="t.pt"):
        lipverify.load_checkpoint(tmp_path / "t.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="not a lipverify checkpoint"):
        lipverify.load_checkpoint(tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="no such"):
        lipverify.load_checkpoint(tmp_path / "missing.pt")


def test_nan_weights_and_shape_mismatch_are_refused(tmp_path) -> None:
    m = _model()
    with torch.no_grad():
        m.last_layer.weight[0, 0] = float("nan")
    lipverify.save_checkpoint(m, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        lipverify.load_checkpoint(tmp_path / "nan.pt")
    state = _model().state_dict()
    state["layer2.0.conv.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="layer2.0.conv.bias"):
        lipverify.load_soc_reference({"state_dict": state, "config": {"init_channels": 4}},
                                     activation="hh2", last_layer="lln")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickle_runs_nothing(tmp_path) -> None:
    target = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Evil(str(target))}, tmp_path / "evil.pt")
    assert not target.exists()
    for loader in (lipverify.load_checkpoint, lipverify.load_soc_reference, load_model):
        with pytest.raises(CheckpointError, match="arbitrary unpickling"):
            loader(tmp_path / "evil.pt")
    assert not target.exists()


def test_read_checkpoint_points_reference_files_elsewhere(tmp_path) -> None:
    torch.save({"state_dict": _model().state_dict(), "config": {}}, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match="load_soc_reference"):
        read_checkpoint(tmp_path / "ref.pt")


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_fixture_reproduces_logits_and_certificates(shared, name: str) -> None:
    path = shared("compat", name)
    d = torch.load(path, weights_only=True)
    m = lipverify.load_soc_reference(path)
    assert not m.training
    x = d["inputs_pixels"]
    with torch.no_grad():
        logits = m(x)
    assert (logits - d["logits"]).abs().max().item() < 1e-4
    cert = lipverify.certify(m, x)
    assert torch.equal(cert.pred, d["pred"])
    assert (cert.radius - d["certificates_pixel_space"]).abs().max().item() < 1e-4
    # load_model recognises the format too, and a state_dict alone works with keywords
    via_load_model = load_model(path)
    assert torch.allclose(via_load_model(x), logits)
    # both entry points record the file's SHA-256 for the audit's provenance
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.checkpoint_sha256 == via_load_model.checkpoint_sha256 == sha
    arch = {"activation": d["config"]["activation"], "num_layers": d["config"]["num_layers"],
            "init_channels": d["config"]["init_channels"],
            "num_classes": d["config"]["num_classes"],
            "last_layer": "lln" if d["config"]["lln"] else "ortho"}
    bare = lipverify.load_soc_reference(d["state_dict"], **arch)
    with torch.no_grad():
        assert torch.allclose(bare(x), logits)


def test_reference_architecture_mismatch_names_the_key(shared) -> None:
    path = shared("compat", FIXTURES[0])
    with pytest.raises(CheckpointError, match="init_channels|layer1.0.conv.random_conv_filter"):
        lipverify.load_soc_reference(path, init_channels=8)
