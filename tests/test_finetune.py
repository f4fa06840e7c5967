"""Fine-tuning: conversations in every documented shape, targets on the replies only, packing that
gives each conversation the loss it gets alone, the per-target normalisation, `kimbho finetune`
end to end, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kimbho
from kimbho.data.chat_data import PackedSampler, pack, prepare_chat, to_batch, tokenize
from kimbho.data.conversations import Conversation, Message, parse_example, read_conversations
from kimbho.errors import KimbhoError
from kimbho.inference.chat import ChatFormat
from kimbho.model.loss import IGNORE
from tests.conftest import run_cli, tiny_run_config

SHAPES = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
    {"prompt": "Hi", "completion": "Hello."},
    {"instruction": "Greet", "input": "Ann", "output": "Hello, Ann."},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
]


def _conversation(i: int) -> dict[str, object]:
    """A conversation of a behaviour the pretraining text never shows: the reply is the user's
    word in capitals, as many times as asked (so conversations differ in length)."""
    word = ["apple", "river", "stone", "cloud", "lamp", "forest", "paper", "window"][i % 8]
    times = 1 + i % 4
    return {
        "messages": [
            {"role": "user", "content": f"Shout {word} {times} times"},
            {"role": "assistant", "content": " ".join([word.upper()] * times)},
        ]
    }


def _write_jsonl(path: Path, examples: list[object]) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in examples))
    return path


def test_every_documented_shape_becomes_messages() -> None:
    parsed = [parse_example(e) for e in SHAPES]
    assert [m.role for m in parsed[0]] == ["system", "user", "assistant"]
    for messages in parsed[1:]:
        assert [m.role for m in messages] == ["user", "assistant"]
    assert parsed[2][0].content == "Greet\n\nAnn" and parsed[2][1].content == "Hello, Ann."
    assert parsed[3][1] == Message("assistant", "Hello.")


def test_bad_lines_are_skipped_with_their_reasons_and_nothing_usable_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            SHAPES[1],
            "{not json",
            {"text": "plain"},
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
            {"prompt": "Hi", "completion": "  "},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "train": False},
                ]
            },
        ],
    )
    read = read_conversations([path])
    assert len(read.conversations) == 1
    reasons = {s.where.rsplit(":", 1)[1]: s.reason for s in read.skipped}
    assert reasons["2"].startswith("not JSON") and "unknown shape" in reasons["3"]
    assert reasons["4"] == reasons["7"] == "no assistant reply to learn from"
    assert "unknown role 'robot'" in reasons["5"] and "non-empty string" in reasons["6"]
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"text": "x"}])
    with pytest.raises(KimbhoError, match=r"no usable conversation .*2 example\(s\) skipped"):
        read_conversations([only_bad])
    with pytest.raises(KimbhoError, match="no such file"):
        read_conversations([tmp_path / "missing.jsonl"])


def test_targets_are_the_replies_and_the_token_that_ends_them(tokenizer: kimbho.Tokenizer) -> None:
    chat = ChatFormat(tokenizer)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hello again."},
    ]
    ids, is_target = chat.encode_conversation(messages, [True, True, False, True, True])
    targets = [i for i, t in zip(ids, is_target, strict=True) if t]
    # Only the second reply (the first is context) with its end-of-text.
    assert targets == [*tokenizer.encode("Hello again."), tokenizer.eot_id]
    # What precedes a reply is exactly the prompt generation gives the model.
    first_target = is_target.index(True)
    assert ids[:first_target] == chat.encode(messages[:4])


def test_a_jinja_template_marks_the_same_replies(tokenizer: kimbho.Tokenizer) -> None:
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    by_template = ChatFormat(tokenizer, template).encode_conversation(messages, [True, True])
    assert by_template == ChatFormat(tokenizer).encode_conversation(messages, [True, True])


def _examples(tokenizer: kimbho.Tokenizer, n: int) -> list:
    conversations = [Conversation(parse_example(_conversation(i)), f"x:{i}") for i in range(n)]
    examples, skipped = tokenize(conversations, ChatFormat(tokenizer), 64)
    assert not skipped
    return examples


def test_packing_keeps_every_conversation_whole_and_rows_full(tokenizer: kimbho.Tokenizer) -> None:
    examples = _examples(tokenizer, 200)  # 15-45 tokens each
    rows, _ = pack(examples, 256)
    tokens = sum(len(e.ids) - 1 for e in examples)
    assert rows.shape[1:] == (4, 256)
    assert 1 - tokens / (len(rows) * 256) < 0.05  # under 5% padding
    inputs = sorted(
        tuple(r[0][r[3] == s]) for r in rows for s in np.unique(r[3]) if (r[1][r[3] == s] != IGNORE).any()
    )
    assert inputs == sorted(tuple(e.ids[:-1]) for e in examples)


def test_a_packed_row_gives_each_conversation_the_loss_it_gets_alone(tokenizer: kimbho.Tokenizer) -> None:
    torch.manual_seed(0)
    model = kimbho.KimbhoV1Model(
        kimbho.KimbhoConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    ).eval()
    examples = _examples(tokenizer, 12)
    rows, _ = pack(examples, 64)
    batch = to_batch(rows)
    with torch.no_grad():
        for r in range(len(rows)):
            for s in torch.unique(batch.segments[r]):
                in_segment = batch.segments[r] == s
                if (batch.targets[r][in_segment] == IGNORE).all():
                    continue  # padding
                targets = torch.where(in_segment, batch.targets[r], IGNORE)[None]
                packed = model(
                    batch.inputs[r : r + 1],
                    positions=batch.positions[r : r + 1],
                    segments=batch.segments[r : r + 1],
                    targets=targets,
                    reduction="sum",
                )
                alone_inputs = batch.inputs[r][in_segment][None]
                alone = model(alone_inputs, targets=batch.targets[r][in_segment][None], reduction="sum")
                assert packed.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-5)


def test_the_sampler_is_a_function_of_seed_and_step_and_visits_every_row_each_epoch(
    tokenizer: kimbho.Tokenizer,
) -> None:
    rows, _ = pack(_examples(tokenizer, 40), 64)
    a, b = PackedSampler(rows, 3, seed=1), PackedSampler(rows, 3, seed=1)
    assert torch.equal(a.batch(5).inputs, b.batch(5).inputs)
    epoch = np.concatenate([a.indices(s) for s in range(len(rows))])  # 3 epochs of rows
    assert sorted(epoch[: len(rows)]) == list(range(len(rows)))
    assert a.num_targets(2) == int((a.batch(2).targets != IGNORE).sum())


def _chat_data(tokenizer: kimbho.Tokenizer, tmp_path: Path, n: int = 120) -> Path:
    path = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(i) for i in range(n)])
    prepare_chat([path], tokenizer, ChatFormat(tokenizer), tmp_path / "chatdata", 64, 0.1)
    return tmp_path / "chatdata"


def test_accumulation_does_not_change_a_fine_tuning_step(
    trained_run: Path, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    """Rows hold different numbers of reply tokens: the update is the mean over the batch's
    targets, however it is split into micro-batches (1 x 8 equals 8 x 1)."""
    data = _chat_data(tokenizer, tmp_path)
    weights = {}
    for micro in (8, 1):
        run = tiny_run_config(
            batch_size=8, micro_batch_size=micro, optimizer="adamw", precision="fp32", max_steps=2
        )
        trainer = kimbho.Trainer(run, data, tmp_path / f"m{micro}", progress_bar=False, init_from=trained_run)
        for step in range(2):
            trainer.train_step(step)
        weights[micro] = trainer.model.state_dict()
    for name, tensor in weights[8].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-6)


def test_finetune_command_writes_a_run_every_command_reads(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(i) for i in range(60)] + ["{broken"])
    out = tmp_path / "ft"
    assert (
        run_cli("finetune", trained_run, "--data", data, "--out", out, "--max-steps", 6, "train.batch_size=4")
        == 0
    )
    assert "finished" in capsys.readouterr().out
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["skipped"] == 1 and meta["splits"]["val"]["conversations"] == 3
    evals = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert evals and evals[-1]["val_loss"] > 0
    model, tok = kimbho.load(out)
    prompt = ChatFormat(tok).encode([{"role": "user", "content": "Shout lamp 2 times"}])
    assert len(kimbho.generate_batch(model, [prompt], max_new_tokens=4)[0]) == len(prompt) + 4
    # Resuming with other data is refused; with the same data it continues.
    other = _write_jsonl(tmp_path / "other.jsonl", [_conversation(i) for i in range(5)])
    assert run_cli("finetune", trained_run, "--data", other, "--out", out, "--resume", "--max-steps", 8) == 1
    assert "differs from the files this run was prepared from" in capsys.readouterr().err
    assert (
        run_cli(
            "finetune",
            trained_run,
            "--data",
            data,
            "--out",
            out,
            "--resume",
            "--max-steps",
            8,
            "train.batch_size=4",
        )
        == 0
    )


def test_finetune_with_nothing_usable_fails_cleanly(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "x"}, "nope"])
    assert run_cli("finetune", trained_run, "--data", data, "--out", tmp_path / "ft") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable conversation" in err[0]
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_a_resumed_fine_tuning_run_is_bit_identical(
    trained_run: Path, tokenizer: kimbho.Tokenizer, tmp_path: Path
) -> None:
    """As after a crash just after step 3 was saved: the resumed run ends with the same weights
    and metrics as the uninterrupted one (the epoch order and the data position are (seed, step))."""
    from safetensors.torch import load_file

    from kimbho.training.metrics import read_metrics
    from tests.conftest import without_wall_clock

    data = _chat_data(tokenizer, tmp_path)
    run = dict(batch_size=4, optimizer="adamw", max_steps=6, save_every=3, eval_every=3, log_every=1)
    full, part = tmp_path / "full", tmp_path / "part"
    for out in (full, part):
        kimbho.Trainer(tiny_run_config(**run), data, out, progress_bar=False, init_from=trained_run).fit()
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    kimbho.Trainer(
        tiny_run_config(**run), data, part, resume=True, progress_bar=False, init_from=trained_run
    ).fit()
    assert without_wall_clock(read_metrics(part)) == without_wall_clock(read_metrics(full))
    a = load_file(full / "checkpoints" / "step-00000006" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
