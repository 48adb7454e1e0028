"""AdaLoRA: the SVD-form forward P Λ Q by hand, the regulariser and the budget schedule by hand, training step by
step against peft 0.21 (losses, rank patterns, outputs), peft's files both ways, and `peftkit train`'s hook."""

from __future__ import annotations

import copy
import json

import pytest
import tiny_runs as T
import torch
from safetensors.torch import load_file

from models import ConvNet, batch, images, output, tiny_bert, tiny_gpt2
from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError
from peftkit.methods.adalora.allocation import after_step, budget_schedule

peft = pytest.importorskip("peft")

TOL = 1e-5
SCHEDULE = dict(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=2)


def bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero singular values and random vectors, so outputs depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def copy_into(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """peft's trainable tensors into peftkit's (same module paths and names)."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, value in theirs.named_parameters():
            if value.requires_grad:
                mine[name].copy_(value)


def test_the_forward_is_w_x_plus_p_lambda_q_x_times_alpha_over_init_r():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))
    pm = get_peft_model(model, AdaLoraConfig(init_r=3, lora_alpha=5, total_step=4, target_modules=["0", "2"]))
    randomise(pm, seed=1)
    s = pm.adapter_state_dict("default")
    x = torch.randn(5, 6)
    scale = 5 / (3 + 1e-5)
    h = model[0].get_base_layer()(x) + x @ (s["0.lora_B"] @ torch.diag(s["0.lora_E"][:, 0]) @ s["0.lora_A"]).T * scale
    h = torch.relu(h)
    y = model[2].get_base_layer()(h) + h @ (s["2.lora_B"] @ torch.diag(s["2.lora_E"][:, 0]) @ s["2.lora_A"]).T * scale
    torch.testing.assert_close(pm(x), y, atol=TOL, rtol=0)
    pm.merge_adapter()  # W + P Λ Q · scale
    torch.testing.assert_close(pm(x), y, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(x), y, atol=TOL, rtol=0)


def test_a_conv2d_runs_delta_w_as_a_convolution_and_grouped_ones_are_refused():
    model = ConvNet()
    pm = get_peft_model(model, AdaLoraConfig(init_r=3, total_step=4, target_modules=["conv1", "pointwise"]))
    randomise(pm, seed=2)
    layer = model.conv1
    delta = (layer.lora_B["default"] @ (layer.lora_A["default"] * layer.lora_E["default"])) * 8 / (3 + 1e-5)
    base = layer.get_base_layer()
    x = images()
    expected = base(x) + torch.nn.functional.conv2d(x, delta.reshape(base.weight.shape), padding=1)
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match="conv2"):
        get_peft_model(ConvNet(), AdaLoraConfig(total_step=4, target_modules=["conv2"]))


def test_the_orthogonality_regulariser_is_peft_s_mean_over_the_matrices():
    pm = get_peft_model(bert(), AdaLoraConfig(init_r=4, total_step=4, orth_reg_weight=0.3, task_type="SEQ_CLS"))
    randomise(pm, seed=3)
    norms = []
    for name, p in pm.named_parameters():
        if "lora_A" in name:
            norms.append(torch.linalg.norm(p @ p.T - torch.eye(4)))
        if "lora_B" in name:
            norms.append(torch.linalg.norm(p.T @ p - torch.eye(4)))
    assert len(norms) == 8  # query and value of 2 layers, P and Q each
    torch.testing.assert_close(pm.auxiliary_loss(), 0.3 * torch.stack(norms).mean(), atol=1e-6, rtol=0)


def test_the_budget_falls_cubically_between_tinit_and_total_step_minus_tfinal():
    config = AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100, deltaT=5)
    initial, target = 12 * 6, 4 * 6
    assert budget_schedule(config, 10, initial, target) == (initial, False)
    for step in (11, 15, 50, 79, 80):
        expected = int((initial - target) * (1 - (step - 10) / 70) ** 3 + target)
        assert budget_schedule(config, step, initial, target) == (expected, step % 5 == 0)
    assert budget_schedule(config, 81, initial, target) == (target, True)
    with pytest.raises(ConfigError, match=r"tinit=10 and tfinal=20 leave no budget phase in total_step=30"):
        AdaLoraConfig(tinit=10, tfinal=20, total_step=30)


@pytest.fixture(scope="module")
def trained():
    """peft and peftkit trained side by side for 10 steps from the same values: (peft model, ours, losses)."""
    base = bert()
    settings = dict(**SCHEDULE, target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**settings))
    ours = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**settings))
    copy_into(ours, theirs)
    inputs, labels = batch("bert"), torch.tensor([0, 1, 2, 1])
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(10):
        loss_theirs = theirs(**inputs, labels=labels).loss  # peft adds the regulariser in its forward
        loss_theirs.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        loss_ours = ours(**inputs, labels=labels).loss + ours.auxiliary_loss()
        loss_ours.backward()
        opt_ours.step()
        ours.update_and_allocate(step)
        opt_ours.zero_grad()
        losses.append((loss_theirs.item(), loss_ours.item()))
    return theirs.eval(), ours.eval(), losses


def test_training_matches_peft_step_by_step(trained):
    theirs, ours, losses = trained
    for a, b in losses:
        assert abs(a - b) < TOL
    pattern = {k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == pattern
    assert sum(sum(v) for v in pattern.values()) == 2 * 4  # target_r per matrix on average
    assert not all(v == pattern[next(iter(pattern))] for v in pattern.values())  # not a trivially equal split
    torch.testing.assert_close(output(ours, batch("bert")), output(theirs, batch("bert")), atol=TOL, rtol=0)


def test_files_both_ways_with_peft_hold_the_kept_triplets_and_the_rank_pattern(trained, tmp_path):
    theirs, ours, _ = trained
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, reference = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert mine["base_model.model.bert.encoder.layer.0.attention.self.query.lora_E"].shape[0] < 6  # truncated
    config, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == peft_config["rank_pattern"]
    expected = output(ours, batch("bert"))
    in_peft = peft.PeftModel.from_pretrained(bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(output(in_peft, batch("bert")), expected, atol=TOL, rtol=0)
    in_ours = PeftModel.from_pretrained(bert(), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(in_ours, batch("bert")), expected, atol=TOL, rtol=0)
    in_ours.merge_adapter()  # the reloaded, truncated adapter merges too
    torch.testing.assert_close(output(in_ours, batch("bert")), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
def test_gpt2_conv1d_and_conv2d_files_both_ways(kind, tmp_path):
    build, targets = (tiny_gpt2, ["c_attn"]) if kind == "gpt2" else (ConvNet, ["conv1", "pointwise", "head"])
    inputs = (lambda m: output(m, batch("gpt2"))) if kind == "gpt2" else (lambda m: m(images()).detach())
    ours = get_peft_model(build(), AdaLoraConfig(init_r=3, total_step=4, target_modules=targets))
    randomise(ours, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(inputs(in_peft), inputs(ours), atol=TOL, rtol=0)
    randomise(in_peft, seed=5)
    in_peft.save_pretrained(tmp_path / "theirs")
    in_ours = PeftModel.from_pretrained(build(), tmp_path / "theirs")
    torch.testing.assert_close(inputs(in_ours), inputs(in_peft), atol=TOL, rtol=0)


def test_total_step_none_is_filled_in_by_the_training_loop_hook():
    pm = get_peft_model(bert(), AdaLoraConfig(init_r=4, target_r=1, tinit=3, task_type="SEQ_CLS"))
    with pytest.raises(ConfigError, match="tinit=3 and tfinal=0 leave no budget phase in total_step=3"):
        after_step(pm, 1, 3)
    pm(**batch("bert"), labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    after_step(pm, 1, 20)
    assert pm.peft_config["default"].total_step == 20


def test_peftkit_train_allocates_after_each_step_and_prints_the_final_rank_per_layer(tmp_path, capsys):
    from peftkit.train import TrainConfig, train

    folder = T.bert_folder(tmp_path / "bert")
    data = T.write_csv(tmp_path / "sentiment.csv", T.sentiment_rows(96))
    args = {"init_r": 4, "target_r": 2, "target_modules": ["query", "value"]}
    result = train(TrainConfig(model=str(folder), data=str(data), method="adalora", method_args=args,
                               output_dir=str(tmp_path / "out"), batch_size=16, max_steps=6, eval_steps=None,
                               progress=False, threads=1))  # fmt: skip
    printed = capsys.readouterr().out
    assert "AdaLoRA 'default' final ranks (8 of 16 triplets kept):" in printed
    lines = [line for line in printed.splitlines() if line.startswith("  bert.encoder.layer.")]
    assert len(lines) == 4 and all(line.endswith(" / 4") for line in lines)
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == 6 and sum(sum(v) for v in saved["rank_pattern"].values()) == 8
    ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert all(f"  {name}: {r} / 4" in lines for name, r in ranks.items())
