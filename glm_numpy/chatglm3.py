"""ChatGLM3: ChatGLM2's network and tokenizer.model, with role tokens, a system prompt and tools.

ChatGLM3's tokenizer numbers four role tokens after ChatGLM2's five specials (n = 64789 pieces):

    [MASK] n  [gMASK] n+1  [sMASK] n+2  sop n+3  eop n+4
    <|system|> n+5  <|user|> n+6  <|assistant|> n+7  <|observation|> n+8     vocab_size = n + 9

A conversation is a list of messages {"role", "content", "metadata"?, "tools"?}, written as

    [gMASK] sop  (<|role|> sp("{metadata}\\n") sp(content))...
                 <|role|> sp("\\n") sp(query)  <|assistant|>

where a system message's "tools" are appended to its content as indented JSON. The model
answers after <|assistant|>: a metadata line (empty for plain text, a tool's name for a tool
call), then the content, and ends its turn with </s>, <|user|> or <|observation|> (the stop ids).
A tool call's content is a code block ```python\\ntool_call(city="Beijing")\\n``` whose keyword
arguments are the parameters; its result comes back as an "observation" message.

As in ChatGLM2, text goes to SentencePiece unchanged (a "<|user|>" typed in a message is plain
text, not the role token). Unlike ChatGLM2, decoding writes every special id as its text, so a
reply that starts a new <|assistant|> segment can be split on it (the official decode).
"""

from __future__ import annotations

import ast
import copy
import json
from collections.abc import Sequence

from glm_numpy.tokenizer import BOS_ID, EOS_ID, UNK_ID, ChatGLM2Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)  # ids n+5 .. n+8, after ChatGLM2's five
# The system prompt that offers tools (ChatGLM3's PROMPT_en.md, openai_api_demo), then their JSON.
TOOL_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)

Message = dict  # {"role": str, "content": str, "metadata"?: str, "tools"?: list}


class ToolCallError(ValueError):
    """A tool call whose arguments are not a tool_call(name=literal, ...) expression."""


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM2Tokenizer plus ChatGLM3's role tokens and conversation format."""

    def __init__(self, path):
        super().__init__(path)
        n = self.sp.GetPieceSize() + len(self.special_ids)
        self.special_ids.update({token: n + i for i, token in enumerate(ROLE_TOKENS)})
        self.role_ids = {role: self.special_ids[f"<|{role}|>"] for role in ROLES}
        # A turn ends when the model writes </s> or hands over to the user or a tool.
        self.stop_ids = (EOS_ID, self.role_ids["user"], self.role_ids["observation"])

    @property
    def vocab_size(self) -> int:
        """The SentencePiece pieces plus nine special tokens (five of ChatGLM2, four roles)."""
        return self.sp.GetPieceSize() + len(self.special_ids)

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        """<|role|> sp(metadata + "\\n") sp(content): one message, no [gMASK] sop."""
        if role not in self.role_ids:
            raise TokenizerError(f"role {role!r}: must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"a {role} message must be text, got {type(content).__name__}")
        return (
            [self.role_ids[role]]
            + self.sp.EncodeAsIds(f"{metadata}\n")
            + self.sp.EncodeAsIds(content)
        )

    def build_chat_input(
        self, query: str, history: Sequence[Message] | None = None, role: str = "user"
    ) -> list[int]:
        """[gMASK] sop, every message of history, the query as a `role` message, <|assistant|>."""
        ids = list(self.prefix_ids)
        for i, message in enumerate(history or []):
            ids += self.build_single_message(*message_parts(message, i))
        return ids + self.continuation_ids(query, role)

    def continuation_ids(self, query: str, role: str = "user") -> list[int]:
        """What one more round appends to a conversation: the query as a `role` message and
        <|assistant|>. A KV cache that holds the earlier rounds is continued with these ids."""
        return self.build_single_message(role, "", query) + [self.role_ids["assistant"]]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; the nine special ids become their text ("<|user|>", "[gMASK]"…),
        <unk>/pad 0, <s> 1 and </s> 2 become nothing. Ids with no text raise TokenizerError."""
        self._check_ids(ids)
        names = {i: name for name, i in self.special_ids.items()}
        text, pieces = "", []
        for i in map(int, ids):
            if i in names:
                text, pieces = text + self.sp.DecodeIds(pieces) + names[i], []
            elif i not in (UNK_ID, BOS_ID, EOS_ID):
                pieces.append(i)
        return text + self.sp.DecodeIds(pieces)


def message_parts(message: Message, index: int) -> tuple[str, str, str]:
    """A history message -> (role, metadata, content), a system message's tools appended to its
    content as JSON indented by 4 (as ChatGLM3 writes them). Bad messages are named by index."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise TokenizerError(
            f"history[{index}]: expected a message {{'role', 'content', 'metadata'?, 'tools'?}} "
            f"with text content, got {message!r:.80}"
        )
    role, content = message.get("role"), message["content"]
    if role not in ROLES:
        raise TokenizerError(f"history[{index}]: role {role!r}: must be one of {', '.join(ROLES)}")
    if role == "system" and "tools" in message:
        content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return role, str(message.get("metadata", "")), content


def tool_system_message(tools: list, prompt: str = TOOL_PROMPT) -> Message:
    """The system message that offers `tools` (a list of JSON-able tool descriptions)."""
    return {"role": "system", "content": prompt, "tools": tools}


def process_response(output: str, history: Sequence[Message]) -> tuple[str | dict, list[Message]]:
    """The decoded reply -> (response, history + the assistant messages), as ChatGLM3 does.

    The reply may hold several <|assistant|> segments, each "metadata\\ncontent". The response
    is the last segment's: its text (stripped, the training-date placeholder filled in) when
    the metadata is empty; else a call {"name": metadata, "parameters": {...}} when the
    conversation offers tools (its first message is a system message with "tools"), or
    {"name": metadata, "content": text} when it does not.
    Raises ToolCallError when a tool call's code is not a tool_call(...) of literal arguments.
    """
    history = copy.deepcopy(list(history))
    offers_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    response: str | dict = ""
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace("[[训练时间]]", "2023年")
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            name = metadata.strip()
            if offers_tools:
                response = {"name": name, "parameters": parse_tool_call(content, name)}
            else:
                response = {"name": name, "content": content}
    return response, history


def parse_tool_call(content: str, name: str = "") -> dict:
    """'```python\\ntool_call(city="Beijing", days=3)\\n```' -> {"city": "Beijing", "days": 3}.

    The official code drops the first and last lines and evaluates the rest with Python's eval;
    here it is parsed, and only keyword arguments that are literals (strings, numbers, lists,
    dicts, True/False/None) are accepted, so a reply can never run code.
    """
    code = "\n".join(content.split("\n")[1:-1]).strip()
    try:
        call = ast.parse(code, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            raise ValueError("not a call")
        if call.func.id != "tool_call" or call.args or any(k.arg is None for k in call.keywords):
            raise ValueError("not tool_call(name=value, ...)")
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ToolCallError(
            f"tool call {name!r}: cannot read its arguments from {content!r:.200} ({err}); "
            "expected ```python / tool_call(name=literal, ...) / ```"
        ) from None
