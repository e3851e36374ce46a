"""Evaluate the embedded default model with glm_numpy's own forward pass, checked against torch.

1. Held-out per-character perplexity per language (the play and the poems prepare_corpus.py kept
   out of training; each text scored after [gMASK] sop): computed by glm_numpy from the shipped
   float16 files, and by the torch module of train_default_model.py on the same weights. The
   two must agree to 1e-3 relative.
2. Chat format: for every held-out poem title, the greedy answer to the single-round chat
   prompt must be well-formed verse (four lines of two seven-character halves, "，" and "。")
   that ends with </s>.
3. Greedy and sampled continuations of "To be, or not to be" and of a held-out poem title, for
   the model card.

Usage: python training/evaluate_default_model.py --workdir training/work
writes the figures to <workdir>/evaluation.json as well as printing them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import (  # noqa: E402
    TinyChatGLM2,
    heldout_documents,
    initial_weights,
    perplexity_from_nll,
    read_jsonl,
    torch_heldout_nll,
)

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer  # noqa: E402
from glm_numpy.assets import default_model_path  # noqa: E402
from glm_numpy.generation import (  # noqa: E402
    GenerationConfig,
    GenerationStats,
    generate_batch,
    generate_stream,
)
from glm_numpy.perplexity import token_nll  # noqa: E402

VERSE = re.compile(
    r"^([\u4e00-\u9fff]{7}，[\u4e00-\u9fff]{7}。\n){3}[\u4e00-\u9fff]{7}，[\u4e00-\u9fff]{7}。$"
)
BARS = {"en": 3.8, "zh": 70.0}


def numpy_heldout_nll(model: ChatGLM2, tokenizer: ChatGLM2Tokenizer, texts: list[str]) -> float:
    """Summed NLL of every text token given [gMASK] sop and the tokens before it."""
    total = 0.0
    for text in texts:
        ids = np.array(tokenizer.encode(text))
        logits = model.forward(ids)  # [T, V]
        total += float(token_nll(logits[1:-1], ids[2:]).sum())
    return total


def torch_model(directory: Path) -> TinyChatGLM2:
    """The shipped float16 weights in the torch module, computing in float32."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model = TinyChatGLM2(config)
    model.load_state_dict(initial_weights(directory))
    return model.eval()


def respond(model, tokenizer, prompt_ids, **options) -> tuple[str, str]:
    """-> (decoded continuation, why it stopped: 'eos' or 'length')."""
    config = GenerationConfig(vocab_limit=tokenizer.vocab_size, **options)
    stats = GenerationStats()
    ids = list(generate_stream(model, prompt_ids, config, stats=stats))
    return tokenizer.decode(ids), stats.stop_reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    parser.add_argument("--model", type=Path, default=default_model_path())
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = ChatGLM2.from_pretrained(args.model)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(args.model)
    reference = torch_model(args.model)
    results: dict = {"perplexity": {}}

    for lang, texts in heldout_documents(args.workdir).items():
        ours = perplexity_from_nll(numpy_heldout_nll(model, tokenizer, texts), texts)
        theirs = perplexity_from_nll(torch_heldout_nll(reference, tokenizer.sp, texts), texts)
        rel = abs(ours - theirs) / theirs
        results["perplexity"][lang] = {
            "glm_numpy": ours,
            "torch": theirs,
            "relative_difference": rel,
            "texts": len(texts),
            "characters": sum(len(t) for t in texts),
            "bar": BARS[lang],
        }
        print(
            f"{lang}: per-char perplexity glm_numpy {ours:.4f} torch {theirs:.4f} (rel {rel:.1e})"
        )

    chats = read_jsonl(args.workdir / "chat_heldout.jsonl")
    # Greedy answers in batches (each row decodes exactly as it would alone); an answer shorter
    # than the budget stopped at </s>.
    budget = 96
    config = GenerationConfig(
        do_sample=False, max_new_tokens=budget, vocab_limit=tokenizer.vocab_size
    )
    good, eos, failures = 0, 0, []
    for start in range(0, len(chats), 32):
        group = chats[start : start + 32]
        prompts = [tokenizer.build_chat_input(c["query"]) for c in group]
        for chat, ids in zip(group, generate_batch(model, prompts, config)):
            answer, stopped = tokenizer.decode(ids), len(ids) < budget
            eos += stopped
            if stopped and VERSE.match(answer.strip()):
                good += 1
            elif len(failures) < 5:
                failures.append({"title": chat["query"], "answer": answer, "eos": stopped})
    results["chat"] = {
        "titles": len(chats),
        "well_formed_with_eos": good,
        "percent": 100.0 * good / len(chats),
        "ended_with_eos": eos,
        "failures": failures,
    }
    print(f"chat: {good}/{len(chats)} well-formed with eos ({100.0 * good / len(chats):.1f}%)")

    title = chats[0]["query"]
    samples = {}
    for name, prompt in [
        ("To be, or not to be", tokenizer.encode("To be, or not to be")),
        (f"chat: {title}", tokenizer.build_chat_input(title)),
    ]:
        samples[name] = {
            "greedy": respond(model, tokenizer, prompt, do_sample=False, max_new_tokens=80)[0],
            "sampled (seed 0, temperature 0.8, top-k 50, top-p 0.8, repetition penalty 1.1)": (
                respond(
                    model, tokenizer, prompt, seed=0, repetition_penalty=1.1, max_new_tokens=80
                )[0]
            ),
        }
    results["samples"] = samples
    print(json.dumps(samples, ensure_ascii=False, indent=2))
    out = args.workdir / "evaluation.json"
    out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
