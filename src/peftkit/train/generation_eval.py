"""Evaluation of a causal LM by generation (``--eval-generate N``): greedy answers to N dev prompts, scored by exact
match against the dev answers.

The prompt and reference of a dev row are read back from its encoding: the reference is the last run of tokens the
loss covers (``labels != IGNORE``; in a multi-turn chat, the last assistant turn), the prompt is every token before
it. So the prompts are exactly what training saw, chat template included, whatever the data format was.

Exact match compares normalised text (whitespace collapsed, case and a final full stop ignored). When the reference
holds GSM8K's ``#### <number>``, only that final number counts: the generation's number after ``####`` or, if it
wrote none, its last number (commas dropped: ``1,000`` = ``1000``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

IGNORE = -100
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """GSM8K's answer: the number after the last ``####``, else the last number in ``text``."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail) or (NUMBER.findall(text) if "####" in text else [])
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def normalise(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").lower()


def exact_match(generated: str, reference: str) -> bool:
    """GSM8K references (``####``): the final numbers agree; other references: the normalised texts are equal."""
    if "####" in reference:
        return final_number(reference) is not None and final_number(generated) == final_number(reference)
    return normalise(generated) == normalise(reference)


def prompt_and_reference(row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of an encoded dev row; None when its loss covers no token."""
    ids, labels = row["input_ids"], row.get("labels")
    if not isinstance(labels, list):
        return None
    covered = [i for i, label in enumerate(labels) if label != IGNORE]
    if not covered:
        return None
    end = covered[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return list(ids[:start]), list(ids[start:end])


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[str]:
    """Continuations of token-id ``prompts`` (greedy unless ``sampling`` says ``do_sample=True, temperature=t``),
    batched with left padding (each row's positions start at its first real token); the new text of each."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    settings = {"do_sample": False, **sampling}
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **settings
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def generation_eval(
    model: Any, tokenizer: Any, dev: list[dict], n: int, max_new_tokens: int, batch_size: int = 8
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """({"exact_match": share}, samples) over the first ``n`` dev rows that have a reference."""
    pairs = [p for p in (prompt_and_reference(row) for row in dev) if p is not None][:n]
    if not pairs:
        return {}, []
    was_training = model.training
    model.eval()
    generated: list[str] = []
    for start in range(0, len(pairs), batch_size):
        generated += generate(model, tokenizer, [p for p, _ in pairs[start : start + batch_size]], max_new_tokens)
    model.train(was_training)
    samples = []
    for (prompt, reference), text in zip(pairs, generated):
        answer = tokenizer.decode(reference, skip_special_tokens=True).strip()
        samples.append(
            {
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "reference": answer,
                "generated": text,
                "exact_match": exact_match(text, answer),
            }
        )
    return {"exact_match": sum(s["exact_match"] for s in samples) / len(samples)}, samples


def show_samples(samples: dict[str, list[dict[str, Any]]], width: int = 300) -> str:
    """The dev answers generated after training (and before, for the same prompts), for the run's printout."""
    before = {s["prompt"]: s["generated"] for s in samples.get("before", [])}
    lines = []
    for i, sample in enumerate(samples["after"], 1):
        prompt = " ".join(sample["prompt"].split())[-width:]
        lines.append(
            f"--- dev prompt {i}: ...{prompt}" if len(sample["prompt"]) > width else f"--- dev prompt {i}: {prompt}"
        )
        if sample["prompt"] in before:
            lines.append(f"before: {before[sample['prompt']][:width]}")
        lines.append(f"after:  {sample['generated'][:width]}")
        lines.append(f"reference: {sample['reference'][:width]}")
    return "\n".join(lines)
