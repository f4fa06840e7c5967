"""The output projection and loss of one `small` training step (16 x 256 tokens, 8192-token
vocabulary), forward and backward: `cross_entropy(head(h))` against Kimbho's chunked, fused
`linear_cross_entropy`. Time, and peak memory above the inputs (each in its own process).

    flock /tmp/kimbho-cpu.lock python bench/loss_speed.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import BATCH, SEQ_LEN, VOCAB, model_config, peak_rss_mb

from kimbho.model.loss import linear_cross_entropy

REPEATS = 5


def worker(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    dim = model_config().emb_dim
    hidden = torch.randn(BATCH * SEQ_LEN, dim, requires_grad=True)
    weight = (torch.randn(VOCAB, dim) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (BATCH * SEQ_LEN,))
    baseline = peak_rss_mb()

    def step() -> None:
        hidden.grad = weight.grad = None
        if name == "unfused":
            loss = F.cross_entropy((hidden @ weight.T).float(), targets)
        else:
            loss = linear_cross_entropy(hidden, weight, targets)
        loss.backward()

    step()
    start = time.perf_counter()
    for _ in range(REPEATS):
        step()
    return {"seconds": (time.perf_counter() - start) / REPEATS, "peak_mb": peak_rss_mb() - baseline}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
        return
    rows = {}
    for name in ("unfused", "fused"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", name], capture_output=True, text=True, check=True
        )
        rows[name] = json.loads(out.stdout.splitlines()[-1])
    print(f"head + cross-entropy, {BATCH * SEQ_LEN} tokens x {VOCAB} vocabulary, forward + backward:")
    print("| loss | seconds | peak memory above inputs (MB) |")
    print("|---|---|---|")
    labels = {"unfused": "cross_entropy(head(h))", "fused": "linear_cross_entropy (chunked, fused)"}
    for name, row in rows.items():
        print(f"| {labels[name]} | {row['seconds']:.3f} | {row['peak_mb']:.0f} |")
    u, f = rows["unfused"], rows["fused"]
    print(
        f"fused: {u['seconds'] / f['seconds']:.2f}x faster, {u['peak_mb'] / max(f['peak_mb'], 1):.1f}x less memory"
    )


if __name__ == "__main__":
    main()
