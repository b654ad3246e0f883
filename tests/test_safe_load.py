"""No file a user passes may run code (docs/method.md §10, issue 16): a pickle whose ``__reduce__`` runs a
shell command is refused by every entry point that loads a checkpoint or weights file, with a
one-line error naming the file, and the command never runs. Our own checkpoints — including those
written before RNG states were stored as tensors — still load."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from amgsn.cli import main
from amgsn.engine import checkpoint as ckpt
from amgsn.safe_load import UnsafeFileError, safe_torch_load


class _Payload:
    """Unpickling this runs ``touch MARKER`` in a shell (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a malicious checkpoint shaped like ours, the marker file its payload would create)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "run" / "checkpoint-last.pth"
    path.parent.mkdir()
    torch.save({"kind": "finetune", "model": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    # The payload really does run when the file is loaded unsafely: the test below is not vacuous.
    probe = tmp_path / "PROBE"
    torch.save(_Payload(probe), tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()
    return path, marker


def _assert_refused(capsys, code: int, path: Path, marker: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert str(path) in err and "not a safe" in err and "system" in err, err  # names the call it refused
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["evaluate", "predict", "export", "finetune-init", "finetune-resume",
                                   "pretrain-resume"])
def test_cli_refuses_a_malicious_checkpoint(entry, evil, tiny_synthetic, tmp_path, capsys):
    path, marker = evil
    data = str(tiny_synthetic)
    image = next((tiny_synthetic / "Image" / "aligned").glob("*.jpg"))
    argv = {
        "evaluate": ["evaluate", "--checkpoint", str(path), "--data-dir", data, "--workers", "0", "--no-progress"],
        "predict": ["predict", str(image), "--checkpoint", str(path)],
        "export": ["export", str(path), "--out", str(tmp_path / "m.safetensors")],
        "finetune-init": ["finetune", "--data-dir", data, "--out", str(tmp_path / "ft"), "--init", str(path),
                          "--workers", "0", "--no-progress"],
        "finetune-resume": ["finetune", "--data-dir", data, "--out", str(tmp_path / "ft"), "--resume", str(path),
                            "--workers", "0", "--no-progress"],
        "pretrain-resume": ["pretrain", "--data-dir", data, "--out", str(tmp_path / "pre"), "--resume", str(path),
                            "--img-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress"],
    }[entry]
    _assert_refused(capsys, main(argv), path, marker)


def test_cli_refuses_a_run_folder_holding_a_malicious_checkpoint(evil, tiny_synthetic, capsys):
    path, marker = evil
    # A run folder resolves to its checkpoint: the same refusal.
    code = main(["evaluate", "--checkpoint", str(path.parent), "--data-dir", str(tiny_synthetic), "--workers", "0",
                 "--no-progress"])
    _assert_refused(capsys, code, path, marker)
    # `report` reads no checkpoint at all (logs, JSON and allow_pickle=False npz only).
    assert main(["report", str(path.parent)]) in (0, 2)
    assert not marker.exists()


def test_python_api_refuses_a_malicious_file(evil, tmp_path):
    from amgsn.engine.export import export
    from amgsn.engine.inference import load_classifier
    from amgsn.models import ViTClassifier

    path, marker = evil
    calls = [lambda: ckpt.load_checkpoint(path), lambda: safe_torch_load(path), lambda: load_classifier(path),
             lambda: export(path, tmp_path / "m.safetensors"),
             lambda: ViTClassifier.from_timm_weights(path, num_classes=7)]
    for call in calls:
        with pytest.raises(UnsafeFileError, match="not a safe"):
            call()
    assert not marker.exists()


def test_unreadable_and_missing_files_are_plain_errors(tmp_path):
    bad = tmp_path / "truncated.pth"
    torch.save({"w": torch.ones(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable") as err:
        safe_torch_load(bad)
    assert not isinstance(err.value, UnsafeFileError)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        safe_torch_load(tmp_path / "missing.pth")


def test_checkpoints_hold_only_tensors_and_plain_types(tmp_path):
    state = {"rng": ckpt.rng_state(), "w": torch.ones(2)}
    ckpt.save_atomic(state, tmp_path / "c.pth")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "c.pth") == []
    torch.load(tmp_path / "c.pth", weights_only=True)  # plain torch, no allow-list


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    ckpt.seed_everything(123)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "c.pth")
    expected = random.random(), np.random.normal(), np.random.rand(3), torch.rand(3)
    ckpt.seed_everything(999)
    ckpt.set_rng_state(safe_torch_load(tmp_path / "c.pth")["rng"])
    got = random.random(), np.random.normal(), np.random.rand(3), torch.rand(3)
    assert got[0] == expected[0] and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_checkpoint_written_before_safe_loading_still_loads(tmp_path):
    # The old format: NumPy's state as the tuple np.random.get_state() returns (an ndarray inside).
    ckpt.seed_everything(7)
    legacy_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = np.random.rand(4)
    path = tmp_path / "old.pth"
    torch.save({"kind": "pretrain", "model": {"w": torch.ones(1)}, "rng": legacy_rng}, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    state = ckpt.load_checkpoint(path, kind="pretrain")
    np.random.seed(0)
    ckpt.set_rng_state(state["rng"])
    assert np.array_equal(np.random.rand(4), expected)


def test_the_numpy_allow_list_admits_no_other_numpy_object(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "x.pth"
    torch.save({"a": np.zeros(2, dtype=np.uint32), "b": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match="system"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [np.float64(1.5), np.uint32(3), np.int64(3), np.ones(2), np.zeros(2, dtype=np.int64),
                                 np.dtype(np.float64)],
                         ids=["float64_scalar", "uint32_scalar", "int64_scalar", "float64_array", "int64_array",
                              "float64_dtype"])
def test_the_numpy_allow_list_admits_only_uint32_arrays(obj, tmp_path):
    # Issue 22: a harmless-looking NumPy object other than the legacy uint32 RNG array — a scalar, even a uint32
    # one (NumPy's `scalar` reconstructor), or anything of another dtype (e.g. `Float64DType`) — must be refused too:
    # the allow-list holds exactly what the legacy RNG state needs, nothing broader.
    path = tmp_path / "x.pth"
    torch.save({"w": torch.ones(1), "x": obj}, path)
    with pytest.raises(UnsafeFileError, match="not a safe checkpoint") as err:
        safe_torch_load(path)
    assert "numpy" in str(err.value)  # names the NumPy global it would need
    torch.save({"w": torch.ones(1), "x": np.arange(3, dtype=np.uint32)}, path)  # the one thing admitted
    assert np.array_equal(safe_torch_load(path)["x"], np.arange(3, dtype=np.uint32))
