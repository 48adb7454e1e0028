"""Hugging Face peft's quicktour (peft 0.21 docs, "Quicktour"), run with peftkit: only the imports changed.

The quicktour loads ``facebook/opt-350m`` from the Hub; offline, this script builds a tiny causal LM from a config and
saves it to a folder, which then plays the Hub model's part. Everything after that is the quicktour's code.

    python scripts/peft_quicktour.py [OUTPUT_FOLDER]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from peftkit import AutoPeftModelForCausalLM, LoraConfig, PeftModel, TaskType, get_peft_model  # was: from peft import


def tiny_hub_model(folder: Path) -> str:
    """Stand-in for a Hub model id: a 2-layer Llama and a word-level tokenizer, saved like a downloaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "the",
        "a",
        "movie",
        "film",
        "plot",
        "was",
        "is",
        "good",
        "bad",
        "great",
        "awful",
        "and",
        "so",
        "very",
        "it",
    ]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(out: Path) -> None:
    model_id = tiny_hub_model(out / "base")  # the quicktour: "facebook/opt-350m"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_id)

    # --- quicktour: "Train" ---
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = AutoModelForCausalLM.from_pretrained(model_id)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    texts = ["the movie was good", "the plot was awful", "a great film", "it is so very bad"] * 8
    dataset = [tokenizer(t) for t in texts]
    training_args = TrainingArguments(
        output_dir=str(out / "your-name/opt-350m-lora"),
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=2,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=dataset[:8],
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
    )
    trainer.train()

    # --- quicktour: "Save model" ---
    model.save_pretrained(out / "output_dir")

    # --- quicktour: "Inference" ---
    model = AutoPeftModelForCausalLM.from_pretrained(out / "output_dir")
    model = model.to("cpu")
    model.eval()
    inputs = tokenizer("the movie", return_tensors="pt")
    outputs = model.generate(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False)
    print(tokenizer.batch_decode(outputs.detach().cpu().numpy(), skip_special_tokens=True)[0])

    # --- the same adapter loaded onto a base model, as the quicktour's PeftModel example ---
    base_model = AutoModelForCausalLM.from_pretrained(model_id)
    model = PeftModel.from_pretrained(base_model, out / "output_dir")
    print("loaded adapters:", model.active_adapters)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
