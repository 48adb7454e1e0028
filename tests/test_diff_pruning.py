"""Diff pruning against closed forms: the hard-concrete gate, the expected-L0 penalty, the magnitude projection,
the sparse checkpoint, and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import batch, build, clone, output, perturb
from peftkit import DiffPruningConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.core.delta import logical, own_params
from peftkit.core.layer import ModulesToSave
from peftkit.errors import CheckpointError, ConfigError, MergeError
from peftkit.methods.diff_pruning import DiffLayer, eval_gate, param_groups, prob_nonzero, sample_gate

TOL = 1e-5


def layers(pm) -> dict[str, DiffLayer]:
    return {logical(n): m for n, m in pm.model.named_modules() if isinstance(m, DiffLayer)}


def with_delta(base, pm, name: str = "default"):
    """A plain copy of the base model with W + d (d computed from the closed form, not by the layer)."""
    ref = clone(base)
    with torch.no_grad():
        for path, layer in layers(pm).items():
            for key, _ in own_params(layer):
                if name in layer.diff_w:
                    c = layer.gate_settings[name]
                    z = torch.sigmoid(layer.diff_log_alpha[name][key]) * (c.stretch_r - c.stretch_l) + c.stretch_l
                    d = z.clamp(0, 1) * layer.diff_w[name][key]
                else:
                    d = torch.zeros(getattr(ref.get_submodule(path), key).numel())
                    d[getattr(layer.diff_index[name], key)] = layer.diff_values[name][key]
                getattr(ref.get_submodule(path), key).add_(d.view_as(getattr(ref.get_submodule(path), key)))
        for path, module in pm.model.named_modules():
            if isinstance(module, ModulesToSave):  # the task head trains whole
                ref.get_submodule(path).load_state_dict(module.modules_to_save[name].state_dict())
    return ref


@pytest.mark.parametrize(("log_alpha", "beta"), [(-1.0, 1.0), (0.5, 2 / 3), (2.0, 1.0), (0.0, 0.5)])
def test_hard_concrete_matches_its_closed_forms(log_alpha, beta):
    low, high, n = -1.5, 1.5, 200_000
    torch.manual_seed(0)
    z = sample_gate(torch.full((n,), log_alpha), beta, low, high)
    assert z.min() >= 0 and z.max() <= 1
    p_nonzero = 1 / (1 + math.exp(-(log_alpha - beta * math.log(-low / high))))  # σ(log α - β log(-l/r))
    p_one = 1 / (1 + math.exp(-(log_alpha - beta * math.log((1 - low) / (high - 1)))))  # P(s̄ >= 1)
    assert abs((z > 0).float().mean().item() - p_nonzero) < 0.005
    assert abs((z == 1).float().mean().item() - p_one) < 0.005
    torch.testing.assert_close(prob_nonzero(torch.tensor(log_alpha), beta, low, high), torch.tensor(p_nonzero))
    expected_eval = min(1.0, max(0.0, 1 / (1 + math.exp(-log_alpha)) * (high - low) + low))
    torch.testing.assert_close(eval_gate(torch.tensor(log_alpha), low, high), torch.tensor(expected_eval))


def test_gate_gradient_reaches_log_alpha():
    log_alpha = torch.zeros(1000, requires_grad=True)
    torch.manual_seed(0)
    sample_gate(log_alpha, 1.0, -0.1, 1.1).sum().backward()
    assert (log_alpha.grad > 0).sum() > 100 and (log_alpha.grad == 0).sum() > 0  # zero only where the clamp saturates


def test_eval_output_is_base_with_w_plus_gated_delta():
    base = build("llama")
    pm = get_peft_model(clone(base), DiffPruningConfig(target_modules="all")).eval()
    perturb(pm, "default", scale=1.0)  # log α = 5 ± 1: some gates below 1
    inputs = batch("llama")
    torch.testing.assert_close(output(pm, inputs), output(with_delta(base, pm), inputs), atol=TOL, rtol=0)
    assert "lm_head" not in layers(pm) and "model.embed_tokens" in layers(pm)  # 'all' leaves the output head
    pm.train()  # sampled gates: stochastic
    with torch.no_grad():
        assert not torch.equal(pm(**inputs).logits, pm(**inputs).logits)


def test_all_with_exclusions_and_layers():
    config = DiffPruningConfig(exclude_modules=r".*attention.*", layers_to_transform=[1], task_type="SEQ_CLS")
    pm = get_peft_model(build("bert"), config)
    assert layers(pm) and all(n.startswith("bert.encoder.layer.1.") and "attention" not in n for n in layers(pm))
    assert "bert.encoder.layer.1.output.LayerNorm" in layers(pm)  # LayerNorm and biases too, not only Linear


def test_auxiliary_loss_is_the_expected_l0_norm():
    config = DiffPruningConfig(target_modules=["query", "value"], l0_lambda=0.01, temperature=0.8)
    pm = get_peft_model(build("bert"), config)
    perturb(pm, "default", scale=2.0)
    expected = 0.0
    for layer in layers(pm).values():
        for a in layer.diff_log_alpha["default"].values():
            expected += torch.sigmoid(a - 0.8 * math.log(1.5 / 1.5)).sum()
    torch.testing.assert_close(pm.auxiliary_loss(), 0.01 * expected)
    with pm.disable_adapter():
        assert pm.auxiliary_loss() == 0.0
    structured = get_peft_model(build("bert"), DiffPruningConfig(target_modules=["query"], structured=True))
    perturb(structured, "default", scale=2.0)
    expected = 0.0
    for layer in layers(structured).values():
        for key, a in layer.diff_log_alpha["default"].items():
            group = layer.diff_group_log_alpha["default"][key]
            expected += torch.sigmoid(group).sum() * torch.sigmoid(a).sum()  # Σ_i P(z_i ≠ 0) P(z_g ≠ 0)
    torch.testing.assert_close(structured.auxiliary_loss(), 1.25e-7 * expected)


def test_finalize_keeps_exactly_the_largest_entries():
    base = build("bert")
    pm = get_peft_model(clone(base), DiffPruningConfig(target_modules="all", task_type="SEQ_CLS")).eval()
    perturb(pm, "default", scale=1.0)
    dense = {
        (p, k): layer.delta("default", k).detach().flatten()
        for p, layer in layers(pm).items()
        for k, _ in own_params(layer)
    }
    everything = torch.cat(list(dense.values()))
    k = round(0.01 * everything.numel())
    assert pm.finalize(0.01) == k
    kept = sum(
        getattr(layer.diff_index["default"], key).numel()
        for layer in layers(pm).values()
        for key, _ in own_params(layer)
    )
    assert kept == k  # exactly round(density * N)
    threshold = everything.abs().topk(k).values[-1]
    for (path, key), d in dense.items():
        layer = layers(pm)[path]
        index = getattr(layer.diff_index["default"], key)
        assert torch.equal(index, (d.abs() >= threshold).nonzero().squeeze(1))  # no ties in random deltas
        torch.testing.assert_close(layer.diff_values["default"][key], d[index])
        assert "default" not in layer.diff_w and "default" not in layer.diff_log_alpha  # w and gates dropped
    assert pm.peft_config["default"].finalized
    inputs = batch("bert")
    torch.testing.assert_close(output(pm, inputs), output(with_delta(base, pm), inputs), atol=TOL, rtol=0)
    assert pm.auxiliary_loss() == 0.0  # no gates left


def test_finalize_breaks_ties_to_the_exact_count():
    pm = get_peft_model(build("llama"), DiffPruningConfig(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in layers(pm).values():
            layer.diff_w["default"]["weight"].fill_(0.5)  # every |d| equal
    n = sum(layer.get_base_layer().weight.numel() for layer in layers(pm).values())
    assert pm.finalize(0.1) == round(0.1 * n)
    assert sum(layer.diff_values["default"]["weight"].numel() for layer in layers(pm).values()) == round(0.1 * n)


def test_sparse_checkpoint_and_round_trip(tmp_path):
    base = build("bert")
    pm = get_peft_model(clone(base), DiffPruningConfig(target_modules="all", task_type="SEQ_CLS")).eval()
    perturb(pm, "default")
    pm.finalize(0.005)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    index_keys = [k for k in saved if ".diff_index." in k]
    assert index_keys and all(saved[k].dtype == torch.int32 for k in index_keys)
    assert all(torch.all(saved[k][1:] > saved[k][:-1]) for k in index_keys if saved[k].numel() > 1)
    assert not any("diff_w" in k or "log_alpha" in k for k in saved)
    targeted = sum(p.numel() for layer in layers(pm).values() for _, p in own_params(layer))
    head = sum(p.numel() for p in base.classifier.parameters())
    k = round(0.005 * targeted)
    assert sum(v.numel() for k, v in saved.items() if ".diff_values." in k) == k
    assert sum(v.nbytes for k, v in saved.items() if ".diff_" in k) == 8 * k  # int32 index + float32 value each
    dense_path = tmp_path / "dense.safetensors"  # the same tensors written dense, for scale
    dense = {
        f"{p}.{key}": layer.delta("default", key).detach().contiguous()
        for p, layer in layers(pm).items()
        for key, _ in own_params(layer)
    }
    save_file(dense, dense_path)
    file_size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert file_size < 0.2 * dense_path.stat().st_size  # tiny model: the JSON header is most of the sparse file
    loaded = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    inputs = batch("bert")
    torch.testing.assert_close(output(loaded, inputs), output(pm, inputs), atol=TOL, rtol=0)
    assert all("default" in layer.diff_values for layer in layers(loaded).values())  # fixed support, no w / gates
    assert head > 0 and sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 0


def test_merge_is_w_plus_d_and_unmerge_w_minus_d():
    base = build("llama")
    pm = get_peft_model(clone(base), DiffPruningConfig(target_modules=["down_proj"])).eval()
    perturb(pm, "default", scale=1.0)
    layer = pm.model.model.layers[0].mlp.down_proj
    d = layer.delta("default", "weight").detach().clone()
    w0 = base.model.layers[0].mlp.down_proj.weight
    pm.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + d, atol=1e-6, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=1e-6, rtol=0)


def test_training_reduces_loss_then_continues_with_the_mask_fixed():
    torch.manual_seed(0)
    model = build("bert")
    config = DiffPruningConfig(target_modules="all", task_type="SEQ_CLS", l0_lambda=1e-4, alpha_init=2.0)
    pm = get_peft_model(model, config)
    inputs, labels = batch("bert", rows=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def run(steps: int) -> list[float]:
        optimizer = torch.optim.AdamW(param_groups(pm, lr=1e-2), lr=1e-2)
        history = []
        for _ in range(steps):
            pm.train()
            task = pm(**inputs, labels=labels).loss
            (task + pm.auxiliary_loss()).backward()
            optimizer.step()
            optimizer.zero_grad()
            history.append(task.item())
        return history

    l0_before = pm.auxiliary_loss().item()
    history = run(20)
    assert history[-1] < 0.5 * history[0]
    assert pm.auxiliary_loss().item() < l0_before  # the penalty closes gates
    pm.finalize(0.02)
    support = {p: layer.diff_index["default"].weight.clone() for p, layer in layers(pm).items()}
    pm.eval()
    with torch.no_grad():
        after_projection = pm(**inputs, labels=labels).loss.item()
    history = run(8)
    assert history[-1] < after_projection
    for path, layer in layers(pm).items():
        assert torch.equal(layer.diff_index["default"].weight, support[path])  # the mask stayed fixed


def test_param_groups_give_gates_their_own_rate():
    pm = get_peft_model(build("bert"), DiffPruningConfig(target_modules=["query"], gate_lr=0.5, task_type="SEQ_CLS"))
    groups = param_groups(pm, lr=1e-3, weight_decay=0.01)
    gates = {id(p) for layer in layers(pm).values() for p in layer.diff_log_alpha["default"].values()}
    assert [g["lr"] for g in groups] == [1e-3, 0.5]
    assert {id(p) for p in groups[1]["params"]} == gates and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == sum(1 for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("stage2_lr", [0.2, None])
def test_param_groups_after_finalize_use_the_stage_two_rate(stage2_lr):
    """Stage 2: no gate is left; the support's values and the head train at stage2_lr (None: the task lr)."""
    config = DiffPruningConfig(target_modules=["query"], stage2_lr=stage2_lr, task_type="SEQ_CLS")
    pm = get_peft_model(build("bert"), config)
    pm.finalize(0.1)
    groups = param_groups(pm, lr=1e-3, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(stage2_lr or 1e-3, 0.01)]
    values = {id(p) for layer in layers(pm).values() for p in layer.diff_values["default"].values()}
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert values < trainable and {id(p) for p in groups[0]["params"]} == trainable  # values + the head


def test_bad_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        DiffPruningConfig(
            target_density=0, stretch_l=0.1, stretch_r=1.0, temperature=-1, gate_lr=-2, stage2_lr=0, structured=1
        )
    message = str(err.value)
    parts = ("target_density=0", "stretch_l=0.1", "stretch_r=1.0", "temperature=-1", "gate_lr=-2", "stage2_lr=0")
    for part in (*parts, "structured=1"):
        assert part in message


def test_bad_finalize_calls():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("diff", DiffPruningConfig(target_modules=["v_proj"]))
    with pytest.raises(ConfigError, match=r"'default' is LoraConfig.*\['diff'\]"):
        pm.finalize(0.01)
    with pytest.raises(ConfigError, match="target_density=1e-09 keeps no entry"):
        pm.finalize(1e-9, adapter_name="diff")
    pm.set_adapter("diff")
    pm.merge_adapter()
    with pytest.raises(MergeError, match="unmerge_adapter"):
        pm.finalize(0.01)
    with pytest.raises(AttributeError):
        pm.not_a_method_function  # noqa: B018


def test_corrupt_checkpoint_is_refused_and_leaves_the_model_untouched(tmp_path):
    base = build("llama")
    pm = get_peft_model(clone(base), DiffPruningConfig(target_modules=["q_proj"]))
    perturb(pm, "default")
    pm.finalize(0.05)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if ".diff_index." in k)
    for bad, message in [(tensors[key].flip(0), "not strictly ascending"), (tensors[key] + 10**6, "outside 0..")]:
        save_file({**tensors, key: bad.contiguous()}, path)
        target = clone(base)
        with pytest.raises(CheckpointError, match=message):
            PeftModel.from_pretrained(target, tmp_path)
        assert not any(isinstance(m, DiffLayer) for m in target.modules())


def test_int_values_in_a_checkpoint_are_blamed_on_their_dtype_not_their_shape(tmp_path):
    """Issue 15 item 31: integer diff_values of the right shape were reported as a shape problem."""
    pm = get_peft_model(build("llama"), DiffPruningConfig(target_modules=["q_proj"]))
    perturb(pm, "default")
    pm.finalize(0.05)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if ".diff_values." in k)
    save_file({**tensors, key: (tensors[key] * 100).to(torch.int64)}, path)  # same shape, integer dtype
    with pytest.raises(CheckpointError, match=r"dtype torch\.int64") as info:
        PeftModel.from_pretrained(build("llama"), tmp_path)
    assert "shape" not in str(info.value)
    assert "float" in str(info.value)  # says what it needs
