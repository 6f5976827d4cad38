"""Task registry: one YAML template per task in data_templates/, rendering both the training format
(prompt, response) and the evaluation format from the same definition, so the two cannot drift.

A template file holds Jinja templates (`prompt`, `response`) and Jinja expressions (`reference`,
`options`, `gold`, `tests`, `entry_point`) over a row's fields:

- kind `generate`: prompt -> response; eval compares a generation with `reference`.
- kind `multiple_choice`: `options` (list) and `gold` (index); `prompt` and `response` may use
  `option`. Training renders them with option = options[gold]; eval renders every option into a
  (context, continuation) pair for log-likelihood scoring.
- kind `code`: prompt -> response (a solution); eval runs `tests` against a completion.
- kind `chat`: no templates; a chat template (the tokenizer's, or `data.chat_template`) renders the
  conversation column named by `conversation` (default: `messages` of role/content) and every
  assistant turn is a target.
- kind `text`: `response` only (raw text for continued pre-training); every token is a target.
- kind `preference` (train.objective dpo/simpo): `prompt`, `chosen` and `rejected` templates give the
  two sequences of a pair, prompt + chosen and prompt + rejected, targets on the completions. With
  `messages: true`, `chosen` and `rejected` instead name columns holding whole conversations that
  share a prefix (HH-RLHF / UltraFeedback-binarized); a chat template renders them, and the turns
  past the shared prefix are the targets.

`defaults` gives values for fields a row may lack (alpaca's `input`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
import jinja2.sandbox
import pydantic
import yaml

from losia_cli.data.sources import check_readable
from losia_cli.errors import DataError
from losia_cli.resources import templates_dir


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} or \fbox{...}, with nested braces balanced. Here, on the data
    floor, for the templates' `last_boxed` filter (MATH targets); eval/extract.py reads answers with it."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


class Conversation(pydantic.BaseModel, extra="forbid"):
    """Where a chat row keeps its turns: the defaults read `messages` of {role, content}."""

    column: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    roles: dict[str, Literal["system", "user", "assistant"]] = {"system": "system", "user": "user", "assistant": "assistant"}
    """Source role name -> chat-template role."""


class TemplateSpec(pydantic.BaseModel, extra="forbid"):
    names: list[str] | None = None  # task names this file registers (default: the file stem)
    family: str
    kind: Literal["generate", "multiple_choice", "code", "chat", "text", "preference"]
    description: str
    sample: str | None = None  # bundled fixture (data_templates/samples/) in this task's schema
    prompt: str | None = None
    response: str | None = None
    reference: str | None = None
    options: str | None = None
    gold: str | None = None
    tests: str | None = None
    entry_point: str | None = None
    chosen: str | None = None  # preference: template (or, with messages, the column) of the preferred side
    rejected: str | None = None
    messages: bool = False  # preference: chosen/rejected are columns of conversations
    defaults: dict[str, Any] = {}
    conversation: Conversation = Conversation()

    @pydantic.model_validator(mode="after")
    def _kind_fields(self) -> TemplateSpec:
        needed = {
            "generate": ("prompt", "response", "reference"),
            "multiple_choice": ("prompt", "response", "options", "gold"),
            "code": ("prompt", "response", "tests"),
            "chat": (),
            "text": ("response",),
            "preference": ("chosen", "rejected") if self.messages else ("prompt", "chosen", "rejected"),
        }[self.kind]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs key(s) {', '.join(missing)}")
        return self


def _regex_replace(text: str, pattern: str, replacement: str) -> str:
    return re.sub(pattern, replacement, text)


def _text_only(value):
    """What a template prints must be text: never `None` or a number's or a list's repr trained on."""
    if not isinstance(value, str):
        raise ValueError(f"the template prints a {type(value).__name__} ({str(value)[:40]!r}), not text "
                         "(`| string` converts it on purpose)")
    return value


# Sandboxed: templates may come from users' recipes. StrictUndefined: a missing field is an error,
# never an empty string silently trained on.
_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_text_only
)
_ENV.filters.update(regex_replace=_regex_replace, last_boxed=lambda text: last_boxed(text) or "")

_TEMPLATE_KEYS = ("prompt", "response", "chosen", "rejected")
_EXPRESSION_KEYS = ("reference", "options", "gold", "tests", "entry_point")
_BOUND = {"option", "options", "gold"}  # names the multiple-choice renderer provides itself


class Task:
    """One task: renders rows (dicts of a source's columns) into training and eval formats."""

    def __init__(self, name: str, spec: TemplateSpec, path: Path, text: str):
        self.name, self.spec, self.path, self.text = name, spec, path, text
        self.kind, self.family = spec.kind, spec.family
        self._templates: dict[str, jinja2.Template] = {}
        self._expressions: dict[str, Any] = {}
        used: set[str] = set()
        printed: set[str] = set()
        try:
            for key in _TEMPLATE_KEYS + _EXPRESSION_KEYS:
                source = getattr(spec, key)
                if source is None or (spec.messages and key in ("chosen", "rejected")):
                    continue
                body = source if key in _TEMPLATE_KEYS else "{{ " + source + " }}"
                ast = _ENV.parse(body)
                used |= jinja2.meta.find_undeclared_variables(ast)
                if key in _TEMPLATE_KEYS:
                    printed |= {node.name for output in ast.find_all(jinja2.nodes.Output)
                                for node in output.nodes if isinstance(node, jinja2.nodes.Name)}
                    self._templates[key] = _ENV.from_string(source)
                else:
                    self._expressions[key] = _ENV.compile_expression(source, undefined_to_none=False)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{path}: template {key!r} line {e.lineno}: {e.message}") from None
        if spec.kind == "chat":
            used = {spec.conversation.column}
        elif spec.messages:
            used = {spec.chosen, spec.rejected}
        elif spec.kind == "multiple_choice":
            used -= _BOUND
        self.fields: frozenset[str] = frozenset(used - spec.defaults.keys())
        """Columns a row must have: every field the template refers to that has no default."""
        self.text_fields: frozenset[str] = frozenset(printed & used - _BOUND)
        """Columns printed as they are (`{{ question }}`): they must hold text."""

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind}, template={self.path})"

    # -- rendering -------------------------------------------------------------------------------
    def _choice(self, row: dict) -> tuple[list, int]:
        options = list(self._expressions["options"](**row))
        gold = int(self._expressions["gold"](**row))
        if not 0 <= gold < len(options):
            raise ValueError(f"gold index {gold} is outside the {len(options)} options")
        return options, gold

    def _render(self, key: str, row: dict, **extra) -> str:
        return self._templates[key].render({**row, **extra})

    def _guard(self, fn, row: dict, *args):
        row = {**row, **{k: v for k, v in self.spec.defaults.items() if row.get(k) is None}}
        # A column absent from some rows reads as None in a dataset: both would render as "None".
        missing = next((name for name in sorted(self.fields) if row.get(name) is None), None)
        if missing:
            raise DataError(f"column {missing!r} is missing or null")
        wrong = next((name for name in sorted(self.text_fields) if not isinstance(row.get(name, ""), str)), None)
        if wrong:
            raise DataError(f"column {wrong!r} is not text: {type(row[wrong]).__name__} {str(row[wrong])[:40]!r}")
        try:
            return fn(row, *args)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"task {self.name} ({self.path.name}): cannot render row: {e}") from None

    def render_train(self, row: dict, tokenizer=None, chat_template: str | None = None) -> tuple[str, str]:
        """(prompt, response) the model is trained on; chat needs the tokenizer and a chat template
        (`chat_template`, else the tokenizer's own)."""
        return self._guard(self._train, row, tokenizer, chat_template)

    def render_eval(self, row: dict, tokenizer=None) -> dict:
        """What an evaluator needs, by kind:
        generate: prompt, target (the training response), reference (the gold answer);
        multiple_choice: contexts, continuations (one per option), gold; a preference pair is one with
        the chosen completion gold, so `acc` is the share of pairs the model finds the chosen more likely;
        code: prompt, target, tests, entry_point (None if the template has none)."""
        return self._guard(self._eval, row, tokenizer)

    def train_segments(self, row: dict, tokenizer=None, chat_template: str | None = None) -> list[tuple[str, bool]]:
        """The training text as (text, is_target) pieces; only chat has more than two."""
        if self.kind == "chat":
            return self._guard(self._chat_segments, row, tokenizer, chat_template)
        prompt, response = self.render_train(row, tokenizer)
        return [(prompt, False), (response, True)]

    @property
    def chat_rendered(self) -> bool:
        """Whether the text comes from a chat template (its special tokens are meant)."""
        return self.kind == "chat" or self.spec.messages

    def pair_segments(self, row: dict, tokenizer=None, chat_template: str | None = None):
        """A preference row as (chosen segments, rejected segments), each [(prompt, False),
        (completion, True)]; an identical chosen and rejected is refused."""
        chosen, rejected = self._guard(self._pair, row, tokenizer, chat_template)
        if chosen == rejected:
            raise DataError("chosen and rejected are identical: the pair prefers nothing")
        return [chosen, rejected]

    def _pair(self, row: dict, tokenizer, chat_template: str | None):
        if not self.spec.messages:
            prompt = self._render("prompt", row)
            return [(prompt, False), (self._render("chosen", row), True)], \
                [(prompt, False), (self._render("rejected", row), True)]
        if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise DataError("the tokenizer has no chat template; set data.chat_template (e.g. chatml)")
        sides = [self._messages({**row, self.spec.conversation.column: row[key]})
                 for key in (self.spec.chosen, self.spec.rejected)]
        shared = 0
        while shared < min(map(len, sides)) and sides[0][shared] == sides[1][shared]:
            shared += 1
        if shared == 0 or any(side[shared:shared + 1] == [] or side[shared]["role"] != "assistant" for side in sides):
            raise ValueError("chosen and rejected must share the conversation up to an assistant turn "
                             "where they differ")
        prompt = tokenizer.apply_chat_template(sides[0][:shared], chat_template=chat_template,
                                               add_generation_prompt=True, tokenize=False)
        out = []
        for side in sides:
            text = tokenizer.apply_chat_template(side, chat_template=chat_template, tokenize=False)
            if not text.startswith(prompt):
                raise ValueError("the chat template does not render the shared prefix as a prefix")
            out.append([(prompt, False), (text[len(prompt):], True)])
        return out

    def _train(self, row: dict, tokenizer, chat_template: str | None) -> tuple[str, str]:
        if self.kind == "chat":
            segments = self._chat_segments(row, tokenizer, chat_template)
            return "".join(text for text, _ in segments[:-1]), segments[-1][0]
        if self.kind == "text":
            return "", self._render("response", row)
        extra = {}
        if self.kind == "multiple_choice":
            options, gold = self._choice(row)
            extra = dict(options=options, gold=gold, option=options[gold])
        return self._render("prompt", row, **extra), self._render("response", row, **extra)

    def _eval(self, row: dict, tokenizer) -> dict:
        if self.kind == "text":
            raise ValueError("a text task (continued pre-training) has no evaluation format")
        if self.kind == "preference":  # two options, the chosen one gold: acc = log-prob margin > 0
            (prompt, chosen), (_, rejected) = [(side[0][0], side[1][0]) for side in self._pair(row, tokenizer, None)]
            return {"kind": "multiple_choice", "contexts": [prompt, prompt], "continuations": [chosen, rejected],
                    "gold": 0}
        if self.kind == "chat":
            messages = self._messages(row)
            prompt = tokenizer.apply_chat_template(
                messages[:-1], add_generation_prompt=True, tokenize=False
            )
            content = messages[-1]["content"]
            return {"kind": "generate", "prompt": prompt, "target": content, "reference": content}
        if self.kind == "multiple_choice":
            options, gold = self._choice(row)
            contexts, continuations = [], []
            for option in options:
                extra = dict(options=options, gold=gold, option=option)
                contexts.append(self._render("prompt", row, **extra))
                continuations.append(self._render("response", row, **extra))
            return {"kind": self.kind, "contexts": contexts, "continuations": continuations, "gold": gold}
        out = {"kind": self.kind, "prompt": self._render("prompt", row), "target": self._render("response", row)}
        if self.kind == "generate":
            out["reference"] = str(self._expressions["reference"](**row))
        else:
            out["tests"] = str(self._expressions["tests"](**row))
            entry = self._expressions.get("entry_point")
            out["entry_point"] = None if entry is None else str(entry(**row))
            # Without an entry point (MBPP) the prompt is prose and the reply the whole program;
            # with one (HumanEval) the reply continues the prompt's function.
            out["completion_only"] = entry is None
        return out


    def _messages(self, row: dict) -> list[dict]:
        """The conversation as [{role, content}] in chat-template roles (system/user/assistant)."""
        schema = self.spec.conversation
        turns = row[schema.column]
        keys = {schema.role_key, schema.content_key}
        if not turns or not all(isinstance(t, dict) and keys <= t.keys() for t in turns):
            raise ValueError(f"`{schema.column}` must be a non-empty list of {{{schema.role_key}, {schema.content_key}}} objects")
        messages = []
        for i, turn in enumerate(turns, start=1):
            role = schema.roles.get(turn[schema.role_key])
            if role is None:
                raise ValueError(f"turn {i} has {schema.role_key} {turn[schema.role_key]!r}; "
                                 f"expected one of {', '.join(schema.roles)}")
            if not isinstance(turn[schema.content_key], str):
                raise ValueError(f"turn {i}: {schema.content_key} is not a string")
            messages.append({"role": role, "content": turn[schema.content_key]})
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last turn must be the assistant's (the training target)")
        return messages

    def _chat_segments(self, row: dict, tokenizer, chat_template: str | None) -> list[tuple[str, bool]]:
        """Split the chat-template rendering into prompt and assistant-turn pieces by rendering
        growing prefixes of the conversation; each assistant turn (with its end-of-turn token) is a
        target. Works with any template whose rendering of a conversation extends the rendering
        of its prefixes, without {% generation %} markers."""
        if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise DataError("the tokenizer has no chat template; set data.chat_template (e.g. chatml)")
        messages = self._messages(row)

        def render(upto: int, generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(
                messages[:upto], chat_template=chat_template, add_generation_prompt=generation_prompt, tokenize=False
            )

        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(i, True), render(i + 1, False)
            if not before.startswith(done) or not through.startswith(before):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be located"
                )
            segments += [(before[len(done) :], False), (through[len(before) :], True)]
            done = through
        return segments


# -- registry ------------------------------------------------------------------------------------
def _read_spec(path: Path) -> tuple[TemplateSpec, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read template ({e.strerror})") from None
    try:
        return TemplateSpec.model_validate(yaml.safe_load(text)), text
    except yaml.YAMLError as e:
        raise DataError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "template"
        raise DataError(f"{path}: {where}: {err['msg']}") from None


def load_task(path: str | Path, name: str | None = None) -> Task:
    """A task from a template file (bundled or the user's own)."""
    path = Path(path).expanduser()
    check_readable(path, "data.template", folders=False)
    spec, text = _read_spec(path)
    return Task(name or (spec.names or [path.stem])[0], spec, path, text)


@functools.cache
def _registry() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(templates_dir().glob("*.yaml")):
        for name in _read_spec(path)[0].names or [path.stem]:
            found[name] = path
    return found


def list_tasks() -> list[str]:
    return sorted(_registry())


@functools.cache
def get_task(name: str) -> Task:
    path = _registry().get(name)
    if path is None:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return load_task(path, name)


def chat_templates_dir() -> Path:
    return templates_dir() / "chat_templates"


def load_chat_template(spec: str | None) -> str | None:
    """Jinja text of `data.chat_template`: a bundled name (chatml, llama-2, gemma) or a file."""
    if spec is None:
        return None
    bundled = {p.stem: p for p in chat_templates_dir().glob("*.jinja")}
    path = bundled.get(spec) or Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for a path: inline Jinja text, perhaps
        raise DataError(f"data.chat_template: {e.strerror}; give a bundled name or a file") from None
    if not exists:
        raise DataError(f"data.chat_template {spec!r} is neither a bundled template ({', '.join(sorted(bundled))}) "
                        "nor a file")
    check_readable(path, "data.chat_template", folders=False)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read chat template: {e}") from None
