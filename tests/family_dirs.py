"""Model directories shaped like the official ones of each family: tiny random weights, the real
tokenizer.model, and the files by which the official directories say which model they are
(config.json "_name_or_path", tokenizer_config.json, tokenization_chatglm.py). docs/family.md
lists the sources; the tokenization_chatglm.py written here is a one-line stand-in for the
official file, holding what tells the two apart (ChatGLM3's lists the role tokens)."""

import json
import shutil
from pathlib import Path

from glm_numpy.testing import write_tiny_checkpoint

NAMES = {
    "chatglm2": "THUDM/chatglm2-6b",
    "chatglm3": "THUDM/chatglm3-6b",
    "codegeex2": "THUDM/codegeex2-6b",
}
TOKENIZER_CODE = {
    "chatglm2": 'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]\n',
    "chatglm3": "role_special_tokens = "
    '["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n',
}
AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
# THUDM/chatglm2-6b's tokenizer_config.json (the copy in ../shared/data/chatglm2-tokenizer)
CHATGLM2_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm2-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": AUTO_MAP,
}
# THUDM/chatglm3-6b's tokenizer_config.json: its keys, and the chat_template of hub commit 103caa4
CHATGLM3_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {},
    "auto_map": AUTO_MAP,
    "chat_template": "{% for message in messages %}{% if loop.first %}"
    "[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "clean_up_tokenization_spaces": False,
    "do_lower_case": False,
    "eos_token": "</s>",
    "pad_token": "<unk>",
    "padding_side": "left",
    "remove_space": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "unk_token": "<unk>",
}
TOKENIZER_CONFIGS = {
    "chatglm2": CHATGLM2_TOKENIZER_CONFIG,
    "chatglm3": CHATGLM3_TOKENIZER_CONFIG,
    "codegeex2": {**CHATGLM2_TOKENIZER_CONFIG, "name_or_path": "THUDM/codegeex2-6b"},
}


def write_family_dir(directory, family, tokenizer_path=None, **config) -> Path:
    """A tiny model directory of `family`, with the real tokenizer when its path is given."""
    directory = write_tiny_checkpoint(
        directory, padded_vocab_size=65024, _name_or_path=NAMES[family], **config
    )
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, directory / "tokenizer.model")
    code = TOKENIZER_CODE["chatglm3" if family == "chatglm3" else "chatglm2"]
    (directory / "tokenization_chatglm.py").write_text(code)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIGS[family], indent=2)
    )
    return directory
