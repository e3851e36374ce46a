"""Train the default model's SentencePiece tokenizer with the real tokenizer's layout.

Same options as THUDM/chatglm2-6b's tokenizer.model (spec §5.1): BPE, byte fallback, every digit
its own piece, identity normaliser (no NFKC), dummy prefix on, extra whitespace kept,
whitespace-only pieces allowed, <unk>=0 <s>=1 </s>=2 and no pad piece. The five ChatGLM2
special tokens are not SentencePiece pieces: ChatGLM2Tokenizer appends them after the
vocabulary ([MASK], [gMASK], [sMASK], sop, eop = n .. n+4), exactly as for the real model.

Usage: python training/train_tokenizer.py --workdir training/work
writes <workdir>/tokenizer.model (copy it to glm_numpy/assets/default_model/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 8000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    prefix = args.workdir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(args.workdir / "tokenizer_corpus.txt"),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=args.vocab_size,
        # Rare Han characters fall back to their UTF-8 bytes instead of crowding out subwords.
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=1,
    )
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    print(f"{prefix}.model: {sp.get_piece_size()} pieces")
    for text in ["To be, or not to be", "[Round 1]\n\n问：春望\n\n答：", "2023年7月"]:
        print(repr(text), "->", sp.encode(text, out_type=str))


if __name__ == "__main__":
    main()
