"""DESIGN.md's shared rules, run for every registered method (see tests/cases.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cases import CASES
from models import BUILDERS, batch, build, clone, output, perturb
from peftkit import BASE, PeftModel, get_peft_model, method_names
from peftkit.core.io import to_file_keys
from peftkit.core.registry import get_method
from peftkit.errors import AdapterNotFoundError, CheckpointError, MergeError

PARAMS = [(m, kind) for m in method_names() if m in CASES for kind in CASES[m].models]
IDS = [f"{m}-{kind}" for m, kind in PARAMS]
TOL = 1e-5


def test_every_method_has_a_case():
    assert set(method_names()) <= set(CASES), f"add a contract case for {set(method_names()) - set(CASES)}"


def make(method: str, kind: str, perturbed: bool = True):
    base = build(kind)
    reference = clone(base)
    pm = get_peft_model(base, CASES[method].config(kind))
    pm.eval()
    if perturbed:
        perturb(pm, "default")
    return pm, reference


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_identity_at_init(method, kind):
    if not CASES[method].identity_at_init:
        pytest.skip(f"{method} adds inputs, so it changes the output from the start (DESIGN.md exempts it)")
    pm, reference = make(method, kind, perturbed=False)
    inputs = batch(kind)
    torch.testing.assert_close(output(pm, inputs), output(reference, inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_only_adapter_parameters_train(method, kind):
    pm, _ = make(method, kind, perturbed=False)
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    saved = {id(t) for t in pm.adapter_state_dict("default").values()}
    assert trainable, "nothing trains"
    assert trainable <= saved, "a trainable tensor would not be saved"
    base_params = {id(p) for p in pm.get_base_model().parameters()}
    frozen_base = [p for p in pm.get_base_model().parameters() if id(p) not in saved]
    assert all(not p.requires_grad for p in frozen_base)
    assert base_params  # the wrapped model still has its parameters
    n_trainable, n_total = pm.get_nb_trainable_parameters()
    assert 0 < n_trainable < n_total


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_save_load_round_trip(method, kind, tmp_path):
    pm, reference = make(method, kind)
    inputs = batch(kind)
    expected = output(pm, inputs)
    assert not torch.allclose(expected, output(reference, inputs), atol=1e-4), "perturbed adapter had no effect"
    pm.save_pretrained(tmp_path)
    saved = set(pm.adapter_state_dict("default"))
    loaded = PeftModel.from_pretrained(clone(reference), tmp_path).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=0)
    assert set(loaded.adapter_state_dict("default")) == saved
    assert not any(p.requires_grad for p in loaded.parameters()), "is_trainable=False must load frozen"
    trainable = PeftModel.from_pretrained(clone(reference), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_merge_unmerge(method, kind):
    pm, reference = make(method, kind)
    inputs = batch(kind)
    if not get_method(method).can_merge:
        with pytest.raises(MergeError, match="cannot be merged"):
            pm.merge_adapter()
        return
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    unmerged = output(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, inputs), unmerged, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    after = pm.get_base_model().state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=TOL, rtol=0, msg=f"{key} not restored")
    plain = pm.merge_and_unload()
    assert type(plain) is type(reference)
    torch.testing.assert_close(output(plain, inputs), unmerged, atol=TOL, rtol=0)


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_two_adapters_switch_and_disable(method, kind):
    pm, reference = make(method, kind)
    inputs = batch(kind)
    out_a = output(pm, inputs)
    pm.add_adapter("b", CASES[method].config(kind))
    perturb(pm, "b", seed=7)
    assert pm.active_adapters == ["default"]
    torch.testing.assert_close(output(pm, inputs), out_a, atol=TOL, rtol=0)
    pm.set_adapter("b")
    out_b = output(pm, inputs)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert all(not p.requires_grad for p in pm.adapter_state_dict("default").values() if p.is_floating_point())
    pm.set_adapter("default")
    torch.testing.assert_close(output(pm, inputs), out_a, atol=TOL, rtol=0)
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, inputs), output(reference, inputs), atol=TOL, rtol=0)
    torch.testing.assert_close(output(pm, inputs), out_a, atol=TOL, rtol=0)
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        pm.set_adapter("nope")
    pm.delete_adapter("b")
    assert list(pm.peft_config) == ["default"]
    torch.testing.assert_close(output(pm, inputs), out_a, atol=TOL, rtol=0)
    base = pm.unload()
    torch.testing.assert_close(output(base, inputs), output(reference, inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_per_row_adapter_names(method, kind):
    pm, reference = make(method, kind)
    pm.add_adapter("b", CASES[method].config(kind))
    perturb(pm, "b", seed=7)
    inputs = batch(kind, rows=4)
    names = ["default", "b", BASE, "b"]
    mixed = output(pm, inputs, adapter_names=names)
    for name in ("default", "b"):
        pm.set_adapter(name)
        alone = output(pm, inputs)
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], alone[rows], atol=TOL, rtol=0)
    torch.testing.assert_close(mixed[[2]], output(reference, inputs)[[2]], atol=TOL, rtol=0)


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_checkpoint_holds_exactly_the_trainable_tensors(method, kind, tmp_path):
    pm, _ = make(method, kind)
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    state = pm.adapter_state_dict("default")
    saved_params = {id(t) for t in state.values() if isinstance(t, torch.nn.Parameter)}
    assert saved_params == trainable, "the adapter's parameters and the trainable ones differ"
    pm.save_pretrained(tmp_path)
    on_disk = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert on_disk == set(to_file_keys(pm.adapter_state_dict("default", for_file=True)))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        n for n in ("adapter_config.json", "adapter_model.safetensors", "README.md") if (tmp_path / n).exists()
    )


def _snapshot(pm) -> tuple[dict, list[str], str, list[str]]:
    tensors = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    grads = [n for n, p in pm.named_parameters() if p.requires_grad]
    return tensors, list(pm.peft_config), repr(pm), grads


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_failed_load_adapter_leaves_the_model_unchanged(method, kind, tmp_path):
    pm, _ = make(method, kind)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].reshape(-1).repeat(2)  # one tensor of another shape
    save_file(tensors, str(path))
    before = _snapshot(pm)
    inputs = batch(kind)
    expected = output(pm, inputs)
    with pytest.raises(CheckpointError):
        pm.load_adapter(tmp_path, adapter_name="other")
    tensors_after, names, structure, grads = _snapshot(pm)
    assert (names, structure, grads) == before[1:]
    assert tensors_after.keys() == before[0].keys()
    assert all(torch.equal(tensors_after[k], v) for k, v in before[0].items())
    torch.testing.assert_close(output(pm, inputs), expected, atol=0, rtol=0)


DECODERS = [(m, kind) for m, kind in PARAMS if kind in ("llama", "gpt2")]


@pytest.mark.parametrize(("method", "kind"), DECODERS, ids=[f"{m}-{k}" for m, k in DECODERS])
def test_generate_runs_and_disabling_gives_the_base_model(method, kind):
    pm, reference = make(method, kind)
    ids = batch(kind, rows=2)["input_ids"]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        tokens = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
        with pm.disable_adapter():
            disabled = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    assert tokens.shape == expected.shape == (2, ids.shape[1] + 4)
    assert torch.equal(tokens[:, : ids.shape[1]], ids)
    assert torch.equal(disabled, expected)


@pytest.mark.parametrize(("method", "kind"), PARAMS, ids=IDS)
def test_loaded_adapter_reproduces_the_saved_model_with_dropout(method, kind, tmp_path):
    """peft loads for inference (eval mode, frozen) unless is_trainable=True; dropout must not stay on."""
    base = BUILDERS[kind]().train()
    reference = clone(base)
    pm = get_peft_model(base, CASES[method].config(kind))
    perturb(pm, "default")
    inputs = batch(kind)
    expected = output(pm.eval(), inputs)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference.train(), tmp_path)
    assert not loaded.training
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=0)


MERGEABLE = [(m, kind) for m, kind in PARAMS if get_method(m).can_merge]


@pytest.mark.parametrize(("method", "kind"), MERGEABLE, ids=[f"{m}-{k}" for m, k in MERGEABLE])
def test_merge_and_unload_merges_exactly_the_named_subset(method, kind):
    pm, _ = make(method, kind)
    inputs = batch(kind)
    only_default = output(pm, inputs)
    pm.add_adapter("b", CASES[method].config(kind))
    perturb(pm, "b", seed=7)
    pm.set_adapter(["default", "b"])
    assert not torch.allclose(output(pm, inputs), only_default, atol=1e-4), "adapter b had no effect"
    plain = pm.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(output(plain, inputs), only_default, atol=TOL, rtol=0)
