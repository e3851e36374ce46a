"""OpenAI chat requests for ChatGLM3 models: its role tokens and tools, as THUDM's
openai_api_demo maps them.

    system / user                  -> {"role": "system" / "user", "content"}
    tool (or function)             -> {"role": "observation", "content"}   (a tool's result)
    assistant with tool_calls      -> per call {"role": "assistant", "metadata": name,
                                       "content": "```python\\ntool_call(k=v!r, ...)\\n```"}

With `tools`, the conversation opens with chatglm3.tool_system_message of their "function"
descriptions, whose prompt is the client's system text when it sends one (as ChatSession's
system= and tools=). The last message (user, or a tool's result) is the query. The reply is read
with chatglm3.process_response: a tool call becomes OpenAI ``tool_calls``, a call whose
arguments cannot be read is returned as its raw text.

No prompt cache: every ChatGLM3 request reads its whole prompt (the cache is keyed by
ChatGLM2's (query, response) rounds).
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from glm_numpy import chatglm3
from glm_numpy.serve.protocol import bad, message_text


@dataclasses.dataclass(frozen=True)
class Conversation3:
    """A ChatGLM3 chat request: the history messages, the query and its role."""

    history: list
    query: str
    role: str  # "user", or "observation" for a tool's result

    @property
    def offers_tools(self) -> bool:
        return bool(self.history) and "tools" in self.history[0]


def parse_tools(tools) -> list | None:
    """OpenAI `tools` -> their function descriptions (None when there are none)."""
    if tools in (None, []):
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and t.get("type", "function") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise bad("tools", 'must be a list of {"type": "function", "function": {"name", ...}}')
    return [t["function"] for t in tools]


def parse_messages3(messages, tools) -> Conversation3:
    """OpenAI chat messages (and tools) -> the ChatGLM3 conversation (module doc)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    functions = parse_tools(tools)
    system, history = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "must be an object with role and content")
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            history += called_tools(message["tool_calls"], f"{where}.tool_calls")
            continue
        content = message_text(message.get("content"), f"{where}.content")
        if role in ("system", "developer") and functions is not None:
            system.append(content)  # the prompt of the tool system message
        elif role in ("system", "developer", "user", "assistant"):
            history.append({"role": "system" if role == "developer" else role, "content": content})
        elif role in ("tool", "function"):
            history.append({"role": "observation", "content": content})
        else:
            raise bad(f"{where}.role", f"must be system, user, assistant or tool, got {role!r}")
    if not history or history[-1]["role"] not in ("user", "observation"):
        raise bad("messages", "the last message must be the user's or a tool's result")
    if functions is not None:
        prompt = "\n".join(system) if system else chatglm3.TOOL_PROMPT
        history.insert(0, chatglm3.tool_system_message(functions, prompt))
    last = history.pop()
    return Conversation3(history, last["content"], last["role"])


def called_tools(tool_calls, where: str) -> list:
    """An assistant message's OpenAI tool_calls -> one ChatGLM3 assistant message per call."""
    if not isinstance(tool_calls, list):
        raise bad(where, "must be a list of tool calls")
    calls = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"{where}[{j}]", 'must be {"type": "function", "function": {"name", ...}}')
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError) as err:
            raise bad(f"{where}[{j}].function.arguments", f"is not a JSON object ({err})") from None
        if not isinstance(arguments, dict):
            raise bad(f"{where}[{j}].function.arguments", "must be a JSON object")
        code = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        calls.append(
            {
                "role": "assistant",
                "metadata": function["name"],
                "content": f"```python\ntool_call({code})\n```",
            }
        )
    return calls


def read_reply(text: str, conversation: Conversation3) -> tuple[str, list | None]:
    """The decoded reply -> (content, tool_calls): a tool call (when tools are offered) as
    OpenAI tool_calls with no content; plain text as content; an unreadable call as its text."""
    asked = [*conversation.history, {"role": conversation.role, "content": conversation.query}]
    try:
        response, _ = chatglm3.process_response(text, asked)
    except chatglm3.ToolCallError:
        return text, None
    if isinstance(response, dict) and "parameters" in response:
        arguments = json.dumps(response["parameters"], ensure_ascii=False)
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": response["name"], "arguments": arguments},
        }
        return "", [call]
    if isinstance(response, dict):  # a named segment without tools offered: its content
        return response["content"], None
    return response, None


class ReplyStream3:
    """A streamed ChatGLM3 reply: ``add`` the raw text as it comes and get the content safe to
    send; a reply whose first line names a tool is held back whole, for ``finish`` to read."""

    def __init__(self, conversation: Conversation3):
        self.conversation, self.raw, self.sent = conversation, "", ""

    def add(self, text: str) -> str:
        self.raw += text
        first_line, newline, _ = self.raw.partition("\n")
        if not newline or first_line.strip() or "<|assistant|>" in self.raw:
            return ""  # no first line yet, or a tool call (or several segments): wait
        return self._delta(read_reply(self.raw, self.conversation)[0], final=False)

    def finish(self) -> tuple[str, list | None]:
        """-> (the content not sent yet, tool_calls) once the reply has ended."""
        content, tool_calls = read_reply(self.raw, self.conversation)
        return ("", tool_calls) if tool_calls else (self._delta(content, final=True), None)

    def _delta(self, content: str, final: bool) -> str:
        """What content adds to what was sent; nothing while it may still change (a
        half-written "[[训练时间]]" placeholder, or whitespace that ends up stripped)."""
        if not content.startswith(self.sent) or (not final and "[[" in content[len(self.sent) :]):
            return ""
        delta, self.sent = content[len(self.sent) :], content
        return delta
