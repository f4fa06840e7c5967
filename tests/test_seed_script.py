"""The seed README's promises: its training script and its inference snippet, as written."""

import subprocess
import sys
from pathlib import Path

import torch

from kimbho import KimbhoV1Model
from tests.conftest import REPO


def test_training_script_and_inference_snippet(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_kimbho_v1.py"),
            "--epochs",
            "2",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if "average loss" in line]
    assert len(losses) > 4 and losses[-1] < losses[0] - 0.5
    assert (tmp_path / "checkpoint_epoch_1.pt").is_file() and (tmp_path / "checkpoint_epoch_2.pt").is_file()

    # The seed README's inference snippet, on the CPU instead of "cuda".
    model = KimbhoV1Model(vocab_size=1000, emb_dim=64, num_heads=8, num_blocks=2, pad_idx=0).to("cpu")
    model.load_state_dict(torch.load(tmp_path / "checkpoint_epoch_2.pt"))
    model.eval()

    prompt_ids = torch.tensor([[12, 45, 67]], dtype=torch.long).cpu()
    max_new_tokens = 20

    for _ in range(max_new_tokens):
        logits = model(prompt_ids)  # (batch_size=1, seq_len, vocab_size)
        next_token_logits = logits[:, -1, :]
        next_token = torch.argmax(next_token_logits, dim=-1, keepdim=True)
        prompt_ids = torch.cat([prompt_ids, next_token], dim=1)

    assert prompt_ids.shape == (1, 23)
    assert prompt_ids[0, :3].tolist() == [12, 45, 67]
