"""Which model of the family a directory holds: ChatGLM2-6B, ChatGLM3-6B or CodeGeeX2-6B.

The three share the network (config keys, tensor names and shapes) and the same
tokenizer.model; what differs is the text around the network (docs/family.md):

    chatglm2   "[Round 1]\\n\\n问：…\\n\\n答：" prompts, stops at </s>
    chatglm3   role tokens <|system|> <|user|> <|assistant|> <|observation|>, tools
    codegeex2  ChatGLM2's tokenizer and code, prompted with "# language: Python\\n…"

and, in the -32K versions, what the config key ``rope_ratio`` means. The official directories
say which model they are in the files they ship, read here as evidence, strongest first:

    tokenization_chatglm.py   ChatGLM3's defines the role tokens; ChatGLM2's (also CodeGeeX2's) not
    tokenizer_config.json     a chat_template that writes <|assistant|> is ChatGLM3's
    names                     config.json "_name_or_path", tokenizer_config.json "name_or_path"
                              ("THUDM/chatglm3-6b-32k" -> chatglm3, "…codegeex2…" -> codegeex2)

Evidence that disagrees is an error naming each file; a directory with no evidence at all is
read as ChatGLM2, this interpreter's own format (the embedded default model ships none).
"""

from __future__ import annotations

import json
from pathlib import Path

from glm_numpy.config import ConfigError

FAMILIES = ("chatglm2", "chatglm3", "codegeex2")
CHATGLM2_CODE = frozenset({"chatglm2", "codegeex2"})  # CodeGeeX2 ships ChatGLM2's code
# How each family's modeling code applies config rope_ratio (glm_numpy.layers.rotary):
ROPE_RATIO_SCALES = {"chatglm2": "positions", "codegeex2": "positions", "chatglm3": "base"}

Evidence = list[tuple[str, frozenset[str]]]  # (what was seen, the families it fits)


class FamilyError(ConfigError):
    """A directory whose files disagree about, or do not say, which model it holds."""


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise FamilyError(f"family {family!r}: must be one of {', '.join(FAMILIES)}")
    return family


def detect_family(directory: str | Path) -> str:
    """The family a model directory holds, from its files (module docstring)."""
    evidence = family_evidence(Path(directory))
    candidates = agreeing(directory, evidence)
    # ChatGLM2's tokenizer code with no name fits CodeGeeX2 as well; the two read and write
    # text alike, and CodeGeeX2's "# language:" prompt is asked for by name (--family).
    return "chatglm2" if candidates >= CHATGLM2_CODE else min(candidates)


def rope_ratio_scales(directory: str | Path, config_values: dict, family: str | None = None) -> str:
    """How this directory's model applies a rope_ratio other than 1: "positions" (divided by it,
    ChatGLM2-6B-32K) or "base" (rotary base multiplied by it, ChatGLM3-6B-32K).

    Decided by `family` when given; else by the modeling_chatglm.py the directory ships (its
    RotaryEmbedding either multiplies the base or divides the positions by self.rope_ratio);
    else by the family evidence. A directory that says nothing is an error: the two readings
    give different models, and neither is a safe guess.
    """
    if family is not None:
        return ROPE_RATIO_SCALES[check_family(family)]
    directory = Path(directory)
    modeling = read_text(directory / "modeling_chatglm.py")
    if modeling is not None and "base * self.rope_ratio" in modeling:
        return "base"
    if modeling is not None and "/ self.rope_ratio" in modeling:
        return "positions"
    evidence = family_evidence(directory, config_values)
    scales = {ROPE_RATIO_SCALES[f] for f in agreeing(directory, evidence)}
    if evidence and len(scales) == 1:
        return scales.pop()
    raise FamilyError(
        f"{directory / 'config.json'}: rope_ratio={config_values.get('rope_ratio')!r}: nothing "
        "in this directory says whether it is ChatGLM2-6B-32K (positions divided by rope_ratio) "
        "or ChatGLM3-6B-32K (rotary base multiplied by it); pass --family chatglm2|chatglm3 "
        "(family= in Python)"
    )


def agreeing(directory, evidence: Evidence) -> set[str]:
    """The families every piece of evidence fits (all of them when there is none)."""
    candidates = set(FAMILIES)
    for _, families in evidence:
        candidates &= families
    if not candidates:
        seen = "; ".join(f"{what} ({' or '.join(sorted(fits))})" for what, fits in evidence)
        raise FamilyError(
            f"{directory}: its files disagree about which model this is: {seen}; "
            "pass --family chatglm2|chatglm3|codegeex2 (family= in Python)"
        )
    return candidates


def family_evidence(directory: Path, config_values: dict | None = None) -> Evidence:
    """What the directory's files say about the family (module docstring), strongest first."""
    evidence: Evidence = []
    code = read_text(directory / "tokenization_chatglm.py")
    if code is not None:
        if "<|observation|>" in code:
            evidence.append(("tokenization_chatglm.py defines the role tokens", {"chatglm3"}))
        else:
            evidence.append(("tokenization_chatglm.py has no role tokens", CHATGLM2_CODE))
    tokenizer_config = read_json(directory / "tokenizer_config.json")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str) and "<|assistant|>" in template:
        evidence.append(
            ("tokenizer_config.json's chat_template writes <|assistant|>", {"chatglm3"})
        )
    if config_values is None:
        config_values = read_json(directory / "config.json")
    for file, values, key in (
        ("config.json", config_values, "_name_or_path"),
        ("tokenizer_config.json", tokenizer_config, "name_or_path"),
    ):
        name = values.get(key)
        family = family_named(name) if isinstance(name, str) else None
        if family is not None:
            evidence.append((f'{file} {key} "{name}"', frozenset({family})))
    return [(what, frozenset(fits)) for what, fits in evidence]


def family_named(name: str) -> str | None:
    """'THUDM/chatglm3-6b-32k' -> 'chatglm3'; names of other models (chatglm-6b…) -> None."""
    name = name.lower()
    for family in ("codegeex2", "chatglm3", "chatglm2"):
        if family in name:
            return family
    return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_json(path: Path) -> dict:
    """A JSON object file's contents; {} when it is absent or not a JSON object (it is then
    simply no evidence; config.json itself is checked by ChatGLM2Config)."""
    text = read_text(path)
    try:
        values = json.loads(text) if text is not None else {}
    except json.JSONDecodeError:
        return {}
    return values if isinstance(values, dict) else {}


def load_tokenizer(model_dir: str | Path, family: str | None = None):
    """The tokenizer of a model directory, with its family's behaviour: ChatGLM3Tokenizer for
    ChatGLM3, ChatGLM2Tokenizer for ChatGLM2 and CodeGeeX2. `family` overrides detection."""
    from glm_numpy.chatglm3 import ChatGLM3Tokenizer
    from glm_numpy.tokenizer import ChatGLM2Tokenizer

    family = check_family(family) if family is not None else detect_family(model_dir)
    tokenizer_class = ChatGLM3Tokenizer if family == "chatglm3" else ChatGLM2Tokenizer
    return tokenizer_class.from_pretrained(model_dir)
