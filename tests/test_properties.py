"""Property tests (hypothesis) over every registered method's checkpoint: damaged configs and tensors.

Each example takes a real adapter folder, changes one adapter_config.json field to a random JSON value of any type, or
one tensor to a random dtype / shape / value, and loads it as a second adapter. Every outcome must be one of:
- a clean load whose adapter holds exactly the file's values (and, for a float tensor of the right shape with finite
  values, a load is the only acceptable outcome);
- a peftkit error (PeftkitError), with the model bit-identical to before: tensors, adapters, structure, flags.
Never a raw TypeError / KeyError / RuntimeError, never a half-applied adapter. The example counts are bounded so the
suite stays fast (PEFTKIT_HYPOTHESIS_EXAMPLES raises them for a longer hunt).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from cases import CASES
from models import batch, build, output, perturb
from peftkit import get_peft_model, method_names
from peftkit.core.io import from_file_keys
from peftkit.errors import PeftkitError

EXAMPLES = int(os.environ.get("PEFTKIT_HYPOTHESIS_EXAMPLES", "12"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
METHODS = [m for m in method_names() if m in CASES]
_FOLDERS: dict[str, Path] = {}


def saved_folder(method: str) -> Path:
    """One perturbed adapter of ``method`` on the tiny BERT, saved once per session."""
    if method not in _FOLDERS:
        pm = get_peft_model(build("bert"), CASES[method].config("bert"))
        perturb(pm, "default")
        folder = Path(tempfile.mkdtemp(prefix=f"peftkit-prop-{method.lower()}-"))
        pm.save_pretrained(folder)
        _FOLDERS[method] = folder
    return _FOLDERS[method]


def fresh_model(method: str):
    """The model a damaged checkpoint is loaded into: the same method's adapter 'default' already attached."""
    pm = get_peft_model(build("bert"), CASES[method].config("bert"))
    perturb(pm, "default", seed=3)
    return pm.eval()


def snapshot(pm) -> tuple:
    tensors = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    flags = [(n, p.requires_grad) for n, p in pm.named_parameters()]
    return tensors, list(pm.peft_config), repr(pm), flags, pm.active_adapters


def assert_unchanged(pm, before: tuple) -> None:
    tensors, *rest = snapshot(pm)
    assert rest == list(before[1:]), "adapters, structure, flags or active adapters changed"
    assert tensors.keys() == before[0].keys()
    for key, value in before[0].items():
        assert torch.equal(tensors[key], value), f"{key} changed"


def load_or_refuse(pm, folder: Path) -> bool:
    """Load ``folder`` as adapter 'x'; True when it loaded, False on a PeftkitError with the model untouched."""
    before = snapshot(pm)
    expected = output(pm, batch("bert"))
    try:
        pm.load_adapter(folder, adapter_name="x")
    except PeftkitError:
        assert_unchanged(pm, before)
        torch.testing.assert_close(output(pm, batch("bert")), expected, atol=0, rtol=0)
        return False
    assert "x" in pm.peft_config
    return True


def copy_of(method: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="peftkit-prop-case-"))
    shutil.copytree(saved_folder(method), target, dirs_exist_ok=True)
    return target


# ---- damaged adapter_config.json --------------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUES = st.one_of(
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3),
)


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(data=st.data())
def test_any_config_value_loads_cleanly_or_is_refused(method, data):
    folder = copy_of(method)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        field = data.draw(st.sampled_from(sorted(k for k in config if k != "peft_type")), label="field")
        value = data.draw(JSON_VALUES, label="value")
        config[field] = value
        (folder / "adapter_config.json").write_text(json.dumps(config))
        pm = fresh_model(method)
        if load_or_refuse(pm, folder):
            saved = pm.peft_config["x"].to_dict()
            if isinstance(value, bool) and isinstance(saved.get(field), bool) and field != "inference_mode":
                assert saved[field] is value, f"{field}={value!r} was read as {saved[field]!r}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- damaged tensors ----------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
VALUES = ["normal", "nan", "inf", "zeros"]


def damaged(original: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) if kind != "zeros" else torch.zeros(shape)
    if kind in ("nan", "inf") and values.numel():
        values.view(-1)[0] = math.nan if kind == "nan" else math.inf
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.nan_to_num(0, 0, 0).round().to(dtype)
    return values.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(data=st.data())
def test_any_tensor_loads_cleanly_or_is_refused(method, data):
    folder = copy_of(method)
    try:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(str(path))
        key = data.draw(st.sampled_from(sorted(tensors)), label="key")
        original = tensors[key]
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        same_shape = data.draw(st.booleans(), label="same shape")
        shape = tuple(original.shape) if same_shape else tuple(data.draw(st.lists(st.integers(0, 6), max_size=3)))
        kind = data.draw(st.sampled_from(VALUES), label="values")
        tensors[key] = damaged(original, dtype, shape, kind, seed=data.draw(st.integers(0, 99)))
        save_file(tensors, str(path))
        pm = fresh_model(method)
        was_float = original.is_floating_point()
        finite = kind not in ("nan", "inf")
        must_load = was_float and dtype.is_floating_point and shape == tuple(original.shape) and finite
        loaded = load_or_refuse(pm, folder)
        if shape != tuple(original.shape) or (was_float and not dtype.is_floating_point) or not finite:
            assert not loaded, f"{key}: {dtype} {shape} {kind} was accepted"
        if must_load:
            assert loaded, f"{key}: a float tensor of the right shape with finite values was refused"
        if loaded:
            live = pm.adapter_state_dict("x", for_file=True)
            for name, tensor in from_file_keys(tensors).items():
                if name in live and tensor.is_floating_point():
                    torch.testing.assert_close(
                        live[name].detach().double(), tensor.double().to(live[name].dtype).double()
                    )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
