"""How exactly do exported models run elsewhere? For one Kimbho MODEL:

- Hugging Face: `kimbho export hf`, then transformers' `LlamaForCausalLM` in fp32: the largest logit
  difference over full-context windows of real text, and greedy continuations compared token by token;
  `AutoTokenizer` against Kimbho's tokenizer on every document of the text.
- llama.cpp (when `llama_cpp` is importable; `make llama-cpp`): `kimbho export gguf` at each dtype,
  tokenization of every document, greedy continuations, largest logit difference.

    python bench/interop_parity.py runs/demo [--text FILE] [--new-tokens 64]

The text defaults to the built-in corpus (CPython's documentation).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import kimbho
from kimbho.interop.gguf import export_gguf
from kimbho.interop.hf import export_hf

PROMPTS = (
    "The assert statement",
    "A class definition",
    "When an exception",
    "The for statement is used to",
    "First Citizen:\nBefore we proceed",
)


def documents(text_file: str | None) -> list[str]:
    if text_file is None:
        from pydoc_data.topics import topics

        return list(topics.values())
    text = Path(text_file).read_text()
    return [text[i : i + 20_000] for i in range(0, len(text), 20_000)]


def leading_match(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def kimbho_greedy(model: kimbho.KimbhoV1Model, ids: list[int], new: int) -> list[int]:
    return kimbho.generate(model, torch.tensor([ids]), max_new_tokens=new, temperature=0.0)[
        0, len(ids) :
    ].tolist()


def hugging_face(model, tokenizer, docs, new, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    export_hf(model, tokenizer, workdir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    hf.generation_config.eos_token_id = None  # compare full continuations
    auto = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    same_docs = sum(auto.encode(d) == tokenizer.encode(d) for d in docs)
    context = model.config.max_seq_len
    stream = [t for d in docs[:50] for t in tokenizer.encode(d)]
    windows = torch.tensor([stream[i : i + context] for i in range(0, 8 * context, context)])
    with torch.no_grad():
        diff = (hf(windows).logits - model(windows)).abs().max().item()
    print("\n## transformers (fp32)\n")
    print(f"AutoTokenizer == Kimbho on {same_docs}/{len(docs)} documents")
    print(f"max |logit difference| over {windows.numel():,} positions: {diff:.2e}")
    print("| prompt | greedy tokens equal |\n|---|---|")
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)[
                0, len(ids) :
            ].tolist()
        print(f"| {prompt!r} | {leading_match(kimbho_greedy(model, ids, new), theirs)}/{new} |")


def llama_cpp(model, tokenizer, docs, new, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError:
        print("\nllama_cpp is not installed (`make llama-cpp`): llama.cpp skipped")
        return
    print("\n## llama.cpp\n")
    print(
        "| GGUF | KV cache | documents tokenized alike | greedy tokens equal, per prompt | max abs logit diff |"
    )
    print("|---|---|---|---|---|")
    f32_cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    runs = [("f32", f32_cache), ("f32", {}), ("f16", {}), ("q8_0", {})]  # {}: llama.cpp's default, f16
    for dtype, kv_cache in runs:
        path = export_gguf(model, tokenizer, workdir / f"m-{dtype}.gguf", dtype=dtype, force=True)
        llm = llama_cpp.Llama(
            str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False, **kv_cache
        )
        same_docs = sum(
            llm.tokenize(d.encode(), add_bos=False, special=False) == tokenizer.encode(d) for d in docs
        )
        matches, diff = [], 0.0
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            llm.reset()
            llm.eval(ids)
            theirs = []
            for _ in range(new):
                theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([theirs[-1]])
            matches.append(leading_match(kimbho_greedy(model, ids, new), theirs))
            with torch.no_grad():
                ours = model(torch.tensor([ids + theirs[:-1]]))[0].numpy()
            diff = max(diff, float(np.abs(np.asarray(llm.scores[: len(ids) + new - 1]) - ours).max()))
        cache = "f32" if kv_cache else "f16"
        print(
            f"| {dtype} | {cache} | {same_docs}/{len(docs)} | {', '.join(map(str, matches))} (of {new}) "
            f"| {diff:.2e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="run directory, checkpoint directory or Hugging Face directory")
    parser.add_argument(
        "--text", help="text file for tokenizer and logit checks (default: the built-in corpus)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = kimbho.load(args.model)
    docs = documents(args.text)
    longest_prompt = max(len(tokenizer.encode(p)) for p in PROMPTS)
    new = min(args.new_tokens, model.config.max_seq_len - longest_prompt)
    print(f"# {args.model}: {model.num_params() / 1e6:.2f}M parameters, context {model.config.max_seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        hugging_face(model, tokenizer, docs, new, Path(tmp))
        llama_cpp(model, tokenizer, docs, new, Path(tmp))


if __name__ == "__main__":
    main()
