"""The seed README's training script, made real.

    python train_kimbho_v1.py

Trains Kimbho V1 with the seed's table of defaults (vocab 1000, emb 64, 8 heads, 2 blocks, pad 0,
group size 4, RoPE base 10000, sequence 32, batch 16, AdamW lr 1e-4, 3 epochs) on the built-in
corpus (CPython's documentation), with real next-token targets, prints average losses
periodically and saves `checkpoint_epoch_{n}.pt`, a plain state dict, after each epoch. The
seed's inference snippet loads it with `model.load_state_dict(torch.load(path))`.

For everything beyond this (your own data, presets, bf16, checkpoints you can resume) use
`kimbho prepare` and `kimbho train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kimbho import KimbhoV1Model, TokenDataset, prepare

# The seed README's hyperparameter table.
vocab_size = 1000
emb_dim = 64
num_heads = 8
num_blocks = 2
pad_idx = 0
group_size = 4
rope_base = 10000.0
seq_len = 32
batch_size = 16
lr = 1e-4
num_epochs = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path("kimbho_v1_data"), help="where the prepared corpus is kept"
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="where checkpoint_epoch_{n}.pt go")
    parser.add_argument("--epochs", type=int, default=num_epochs)
    args = parser.parse_args()

    torch.manual_seed(0)
    if not (args.data / "meta.json").exists():
        print(f"preparing the built-in corpus with a {vocab_size}-token tokenizer into {args.data}/")
        prepare(None, args.data, vocab_size=vocab_size)

    dataset = TokenDataset(args.data, seq_len)
    train_loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = KimbhoV1Model(
        vocab_size=vocab_size,
        emb_dim=emb_dim,
        num_heads=num_heads,
        num_blocks=num_blocks,
        pad_idx=pad_idx,
        group_size=group_size,
        rope_base=rope_base,
        max_seq_len=seq_len,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    print(
        f"Kimbho V1: {model.num_params():,} parameters, {len(dataset):,} sequences of {seq_len} tokens, {device}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, args.epochs + 1):
        model.train()
        running, count = 0.0, 0
        for i, (input_ids, target_ids) in enumerate(train_loader, 1):
            input_ids, target_ids = input_ids.to(device), target_ids.to(device)
            logits = model(input_ids)  # (batch, seq_len, vocab_size)
            loss = F.cross_entropy(
                logits.reshape(-1, vocab_size), target_ids.reshape(-1), ignore_index=pad_idx
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count = running + loss.item(), count + 1
            if i % 100 == 0 or i == len(train_loader):
                print(f"epoch {epoch} step {i}/{len(train_loader)}: average loss {running / count:.4f}")
                running, count = 0.0, 0
        path = args.out / f"checkpoint_epoch_{epoch}.pt"
        torch.save(model.state_dict(), path)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
