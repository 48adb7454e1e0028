"""How much of SST-2 the frozen MiniLM already separates: a linear probe on three sentence representations.

    python benchmarks/sst2_probe.py              # the first 2,000 training rows, the 872 dev sentences

The classification head of ``BertForSequenceClassification`` reads the [CLS] token through BERT's pooler
(dense + tanh). all-MiniLM-L6-v2 was trained as a sentence encoder on the *mean* of its token vectors, so its [CLS]
vector carries less of the sentence. This script fits a logistic regression to convergence (L-BFGS, L2 penalty) on
the frozen model's [CLS] vector, its pooler output and its mean token vector, for the same rows the short SST-2 runs
train on (benchmarks/sst2_bottleneck.py: the first ``--rows`` rows of train.tsv, max length 64), and prints the dev
accuracy of each. Adapters that leave attention unchanged (bottleneck, Compacter) have to move the sentence into
[CLS] through the frozen attention; this is the floor they start from. About 30 s on two cores.
"""

from __future__ import annotations

import argparse

import torch
from common import DATA_ROOT, minilm_folder, read_sst2
from transformers import AutoModel, AutoTokenizer

DATA = DATA_ROOT / "sst2"


def rows(name: str, limit: int | None) -> tuple[list[str], torch.Tensor]:
    """The first ``limit`` (sentence, label) rows of a tsv file, in file order (as ``peftkit train`` reads them)."""
    sentences, labels = read_sst2(DATA / name)
    return sentences[:limit], torch.tensor(labels[:limit])


@torch.no_grad()
def features(model, tokenizer, sentences: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """{"cls", "pooler", "mean"}: (N, d) each."""
    out: dict[str, list[torch.Tensor]] = {"cls": [], "pooler": [], "mean": []}
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        result = model(**enc)
        hidden, mask = result.last_hidden_state, enc["attention_mask"].unsqueeze(-1).float()  # (B, T, d), (B, T, 1)
        out["cls"].append(hidden[:, 0])
        out["pooler"].append(result.pooler_output)
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor, l2: float) -> float:
    """Dev accuracy of a logistic regression fitted to convergence on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    weight = torch.zeros(train_x.shape[1], 2, requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((dev_x @ weight + bias).argmax(1) == dev_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="L2 penalties to try")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"SST-2 not found at {DATA}; set PEFTKIT_DATA to the folder that holds sst2/.")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    model = AutoModel.from_pretrained(minilm_folder()).eval()
    train_s, train_y = rows("train.tsv", args.rows)
    dev_s, dev_y = rows("dev.tsv", None)
    train_f, dev_f = features(model, tokenizer, train_s), features(model, tokenizer, dev_s)
    print(f"frozen MiniLM, logistic regression on the first {args.rows} SST-2 rows; dev accuracy ({len(dev_y)} rows)")
    print(f"{'representation':<16}" + "".join(f"  l2 {l2:<8g}" for l2 in args.l2))
    for name in train_f:
        scores = [probe(train_f[name], train_y, dev_f[name], dev_y, l2) for l2 in args.l2]
        print(f"{name:<16}" + "".join(f"  {s:<11.4f}" for s in scores))


if __name__ == "__main__":
    main()
