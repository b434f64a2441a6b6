"""Tool calling. The model writes a call as {"name": ..., "arguments": {...}}, its arguments valid
against the tool's parameters (the same grammar masks as structured outputs, engine/guided.py); the
answer carries it as `tool_calls` with finish_reason "tool_calls".

- `tool_choice` "required" or a named function: the answer is one call (of that function).
- "auto" (the default when tools are given): the model chooses. How it starts decides: '{' starts a
  call, and so does "<tool_call>" (Hermes' and Qwen's format, which their chat templates ask for:
  one or more calls, each between the tags); the grammar then holds it to valid calls. Anything else
  is a text answer, free to the end (so a text answer cannot start with '{' or "<tool_call>"). Other
  families' own formats (Llama 3's "parameters", Mistral's [TOOL_CALLS]) have no parser here (vLLM's
  --tool-call-parser has one per family): a call from such a model is held to the JSON form above.
- "none": a text answer; the tools are ignored.

The deprecated function calling (`functions`, `function_call`, which older clients such as LangChain's
OpenAI-functions agents still send) is served as tools (legacy_functions): `function_call` "auto",
"none" or {"name": ...} is the matching tool_choice, one call at most; the answer carries it as
`function_call` with finish_reason "function_call", and a conversation's earlier calls (an assistant
message's `function_call`) and results (role "function") reach the template as tool calls and tool
messages.

The tools reach the model through its chat template when the template renders them (`tools`), else as
a system message that lists them and the call format. A follow-up conversation (an assistant message
with `tool_calls`, then `tool` messages with the results) is passed to the template the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from mygpt.api.errors import invalid
from mygpt.api.protocol import Tool, ToolCall, ToolCallFunction

TAGS = ("<tool_call>", "</tool_call>")  # the call blocks "auto" takes besides bare JSON (Hermes, Qwen)
_BLOCK = re.compile(re.escape(TAGS[0]) + r"\n?(.*?)\n?" + re.escape(TAGS[1]), re.S)


@dataclass(frozen=True)
class ToolPlan:
    """The tools a call may use (one for a named tool_choice); auto: the model may answer in text."""

    tools: list[Tool]
    auto: bool = False
    many: bool = True  # more than one call may come (parallel_tool_calls, true by default; tagged blocks)
    structured: bool = False  # "auto" with a response_format: an answer is JSON of it, not free text

    def is_call(self, text: str) -> bool | None:
        """Whether an answer that starts with `text` is calls (True) or an answer (False); None while it
        could still be either. Forced: always a call. "auto": by how it starts (is_call); with a
        response_format, whose answer is JSON, calls come only in their tags (the grammar's), so the
        open tag decides."""
        if not self.auto:
            return True
        if not self.structured:
            return is_call(text)
        return True if text.startswith(TAGS[0]) else None if TAGS[0].startswith(text) else False

    def schema(self) -> dict[str, Any]:
        """JSON Schema of one call: {"name": one of the tools, "arguments": that tool's parameters}.
        The parameters move under the call, so their own references ("#/$defs/...", "#") are moved
        with them."""
        calls = []
        for k, t in enumerate(self.tools):
            at = "/properties/arguments" if len(self.tools) == 1 else f"/anyOf/{k}/properties/arguments"
            calls.append({
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": _rebased(parameters(t), at)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            })  # fmt: skip
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters schema (none given: no arguments)."""
    return tool.function.parameters or {"type": "object", "properties": {}}


def _rebased(schema: Any, at: str) -> Any:
    """`schema` with each local $ref ("#...") pointing into the place `at` the schema now sits."""
    if isinstance(schema, dict):
        return {
            k: (
                "#" + at + v[1:]
                if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else _rebased(v, at)
            )
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebased(v, at) for v in schema]
    return schema


def plan(req: Any, legacy: bool = False) -> ToolPlan | None:
    """The request's tool plan, None for a plain answer (no tools, or "none"); 400s name the problem
    (legacy: in the words of the deprecated functions API the request used)."""
    # the request's own words: its tools and choice, or the deprecated functions and function_call
    tools_name, choice_name = ("functions", "function_call") if legacy else ("tools", "tool_choice")
    choice, tools = req.tool_choice, req.tools or []
    if choice is None and not tools or choice == "none":
        return None
    if not tools:
        raise invalid(f"{choice_name} is only allowed when {tools_name} are given.", param=choice_name)
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise invalid(f"{tools_name} have to have different names.", param=tools_name)
    for i, t in enumerate(tools):
        if parameters(t).get("type", "object") != "object":
            raise invalid(
                f"a {'function' if legacy else 'tool'}'s parameters must be a JSON Schema of an object.",
                param=f"functions.[{i}].parameters" if legacy else f"tools.[{i}].function.parameters",
            )
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        choice, tools = _allowed(choice.get("allowed_tools"), tools)
    auto = choice in (None, "auto")
    # with a response_format, "auto" answers with calls or with JSON of that format; a forced call is
    # the answer (the format holds for a later turn's answer)
    structured = auto and req.response_format is not None and req.response_format.type != "text"
    if auto:  # stop strings end a text answer; one inside a call cuts it, which then comes back as text
        return ToolPlan(tools, auto=True, many=req.parallel_tool_calls is not False, structured=structured)
    if choice == "required":
        return ToolPlan(tools)
    if not legacy and (not isinstance(choice, dict) or choice.get("type", "function") != "function"):
        kind = repr(choice.get("type")) if isinstance(choice, dict) else repr(choice)
        raise invalid(
            f"tool_choice {kind} is not supported; use 'auto', 'none', 'required', "
            '{"type": "function", "function": {"name": ...}} or {"type": "allowed_tools", ...}.',
            param="tool_choice",
        )
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    named = [t for t in tools if t.function.name == name]
    if not named:
        shown = repr(req.function_call if legacy else choice)  # as the client wrote it
        raise invalid(
            f"{choice_name} names no {'function' if legacy else 'tool'} of this request: {shown}.",
            param=choice_name,
        )
    return ToolPlan(named)


def _allowed(allowed: Any, tools: list[Tool]) -> tuple[str, list[Tool]]:
    """tool_choice {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}: the mode ("auto" or
    "required") over those of the request's tools it lists; 400s naming the problem."""
    where = "tool_choice.allowed_tools"
    spec = allowed if isinstance(allowed, dict) else {}
    mode, listed = spec.get("mode"), spec.get("tools")
    if mode not in ("auto", "required") or not isinstance(listed, list) or not listed:
        raise invalid(
            f"{where} needs a mode ('auto' or 'required') and a list of the request's tools.", param=where
        )
    wanted, names = [], {t.function.name for t in tools}
    for k, item in enumerate(listed):
        function = item.get("function") if isinstance(item, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise invalid(
                f"{where}.tools names no tool of this request: {item!r}.", param=f"{where}.tools.[{k}]"
            )
        wanted.append(name)
    return mode, [t for t in tools if t.function.name in wanted]


def legacy_functions(req: Any) -> Any | None:
    """The request with its deprecated `functions` / `function_call` as tools / tool_choice (one call at
    most, as that API had), or None when it uses neither; 400s name the problem."""
    if req.functions is None and req.function_call is None:
        return None
    if req.tools is not None or req.tool_choice is not None:
        raise invalid(
            "functions and function_call cannot be combined with tools or tool_choice; use one or the other.",
            param="functions" if req.functions is not None else "function_call",
        )
    choice = req.function_call
    if isinstance(choice, dict):
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid(
                "function_call must be 'auto', 'none' or {\"name\": <a function>}.", param="function_call"
            )
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in (None, "auto", "none"):
        raise invalid(
            "function_call must be 'auto', 'none' or {\"name\": <a function>}.", param="function_call"
        )
    # the rest (names, parameters, the named function) plan(legacy=True) checks, in these words
    functions = [Tool(type="function", function=f) for f in req.functions or []]
    return req.model_copy(
        update={"tools": functions or None, "tool_choice": choice, "parallel_tool_calls": False}
    )


def legacy_call(i: int, call: Any) -> None:
    """An assistant message's deprecated function_call: a 400 naming it unless it has a name and JSON
    arguments."""
    _called_function(call, f"messages.[{i}].function_call", "function_call")


def _called_function(function: Any, where: str, what: str = "tool call") -> dict[str, Any]:
    """A call's function as chat templates take it ({name, arguments as an object}); a 400 naming
    `where` unless it has a name and JSON arguments."""
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        need = (
            "a function_call needs a name"
            if what == "function_call"
            else "each tool call needs a function with a name"
        )
        raise invalid(f"{need}.", param=where)
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as exc:
        raise invalid(f"{what} arguments are not JSON: {exc}", param=where) from exc
    return {"name": function["name"], "arguments": parsed}


def with_tools(messages: list[dict[str, Any]], calls: ToolPlan) -> list[dict[str, Any]]:
    """The tools for a chat template that does not render them: told in the system message (the
    client's own first one, extended, so that templates taking one system message at the start still
    take it)."""
    call = '{"name": <function name>, "arguments": <its arguments>}'
    how = f"{TAGS[0]}{call}{TAGS[1]}" if calls.structured else f"a JSON object: {call}"
    text = (
        "You can call these functions:\n"
        + json.dumps([template_tool(t)["function"] for t in calls.tools], ensure_ascii=False)
        + f"\nTo call one, reply with only {how}."
        + (
            f" If no function is needed, answer {'with a JSON object' if calls.structured else 'in plain text'}."
            if calls.auto
            else ""
        )
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def template_tool(tool: Tool) -> dict[str, Any]:
    """A tool as chat templates read it (description and parameters always there)."""
    f = tool.function
    return {
        "type": "function",
        "function": {"name": f.name, "description": f.description or "", "parameters": parameters(tool)},
    }


def template_renders_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def assistant_calls(i: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates take them (arguments as an object)."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        parsed = _called_function(function, f"messages.[{i}].tool_calls.[{j}]")
        out.append({"id": call.get("id"), "type": "function", "function": parsed})
    return out


def written(calls: list[dict[str, Any]]) -> str:
    """Calls (as chat templates take them) in the form the system message tells the model to write."""
    return "\n".join(
        json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
        )
        for c in calls
    )


def is_call(text: str) -> bool | None:
    """Whether an "auto" answer that starts with `text` is calls (True) or text (False); None while it
    could still be either: only whitespace, or the start of the open tag (the grammar lets calls start
    only with '{' or the open tag, at the very start)."""
    if text.startswith(("{", TAGS[0])):
        return True
    return None if not text or text.isspace() or TAGS[0].startswith(text) else False


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls the model wrote, bare JSON or in tagged blocks (None if one is incomplete or invalid)."""
    if text.startswith("{"):
        call = parse_call(text)
        return None if call is None else [call]
    calls = [parse_call(block) for block in _BLOCK.findall(text)]
    return calls if calls and all(calls) else None


def answer(calls_plan: ToolPlan, text: str, finish: str | None) -> tuple[list[ToolCall] | None, str | None]:
    """A whole answer under a tool plan: (its calls, "tool_calls"); calls cut by max_tokens as far as
    they were written, (calls, "length"), as OpenAI returns them (cut_calls); or (None, its finish
    reason) for a text answer of tool_choice "auto", or an "auto" call cut by a stop string (it comes
    back as its text)."""
    if not calls_plan.is_call(text):
        return None, finish
    if finish == "length":  # whole where max_tokens ran out as the last call closed
        calls, whole = cut_calls(calls_plan, text)
        return calls or None, "tool_calls" if calls and whole else finish
    calls = parse_calls(text) if finish == "stop" else None
    return (calls, "tool_calls") if calls else (None, finish)


_OPEN = '{"name": "'  # a call's start, as the grammar writes it (JSON_OPTIONS' separators)
_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)(")?(, "arguments": )?')


def cut_calls(calls_plan: ToolPlan, text: str) -> tuple[list[ToolCall], bool]:
    """The calls of an answer cut by max_tokens, and whether they are whole: the whole ones, then the
    one being written, with its arguments as far as they came (partial JSON) and its name (where the
    name itself was cut, the one tool it can be; no call if it could be several)."""
    whole, rest, tagged = [], text, text.startswith(TAGS[0])
    if tagged:
        blocks = list(_BLOCK.finditer(text))
        whole = [parse_call(b[1]) for b in blocks]
        rest = text[blocks[-1].end() :] if blocks else text
        rest = rest.lstrip("\n").removeprefix(TAGS[0]).lstrip("\n")
    if not all(whole):
        return [], False
    closing = next((k for k in range(len(TAGS[1]), 0, -1) if tagged and rest.endswith(TAGS[1][:k])), 0)
    call = parse_call(rest[: len(rest) - closing].rstrip("\n")) if rest.startswith("{") else None
    if call is not None:  # closed as the tokens ran out (in a block: its close tag cut)
        return [*whole, call], not tagged
    head = _HEAD.match(rest)
    if head is None and not (rest and _OPEN.startswith(rest)):  # (cut before the name: a name "")
        return whole, not rest
    written = head[1] if head else ""
    try:
        name = json.loads(f'"{written}"')
    except json.JSONDecodeError:  # cut inside an escape
        name = written
    if head is None or head[2] is None:  # the name was cut
        names = [t.function.name for t in calls_plan.tools if t.function.name.startswith(name)]
        if len(names) != 1:
            return whole, False
        name = names[0]
    arguments = rest[head.end() :] if head and head[3] else ""
    cut = ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(name=name, arguments=arguments)
    )
    return [*whole, cut], False


def parse_call(text: str) -> ToolCall | None:
    """The call the model wrote (None if it is incomplete, cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or "name" not in value:
        return None
    try:  # strict JSON: a number the model wrote as 1e999 would come back as Infinity
        arguments = json.dumps(value.get("arguments", {}), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(name=value["name"], arguments=arguments)
    )
