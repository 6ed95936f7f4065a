"""Chats in the model's own chat template: the text, the token ids, and the loss's targets.

An instruct model was tuned on conversations written in one exact format, its chat template (a
Jinja program shipped in the model folder). SmolLM2 writes ChatML:

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

and Llama-3.2 its own headers, after a system header that always carries a date:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: ...
    <|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>

Fine-tuning on chats must feed the model those same tokens, so this file renders the template the
way transformers' apply_chat_template does (same Jinja settings, same variables) and tokenizes the
text the same way: special tokens written as text, the template's and the messages' alike, become
their ids, and nothing is added around them (Llama's template writes <|begin_of_text|> itself).
The tests check the ids against transformers, which is never imported here.

The loss trains on what the assistant says: each assistant turn's content and the end-of-turn
token that closes it (so the model learns to stop), not the prompt, nor the headers, nor the "\\n"
ChatML writes after <|im_end|>. Those tokens are found by rendering prefixes of the chat: the text
up to an assistant turn's header and the text up to the end of that turn; between the two lies
the turn. That only holds for a template that renders a conversation's start the same whatever
follows, which is checked, and a template that does not is refused.
"""
import json
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

# Llama-3.2's template writes "Today Date: <the day>" into every system header, from the variable
# date_string, or strftime_now("%d %b %Y") when it is not given. With the real day, the same
# training data would give different tokens each day (and a model trained one day would be
# prompted differently the next). So the day is fixed, to the date the template itself falls back
# to without a clock; pass date_string to render another one.
DATE_STRING = "26 Jul 2024"
# What strftime_now formats: the same fixed day, for templates that ask for the time directly.
FIXED_NOW = datetime(2024, 7, 26)


# ----------------------------------------------------------------------------- the template file

def read_chat_template(model_dir) -> str | None:
    """The chat template of a Hugging Face model folder: the file chat_template.jinja (where
    transformers 5 writes it), else tokenizer_config.json's "chat_template" (a string, or a list
    of {"name", "template"} of which "default" is taken); None when the folder has neither.
    Raises ValueError naming the file when it cannot be read or holds no usable template."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        # transformers takes this file before tokenizer_config.json's template, so we do too.
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja_file}: cannot read the chat template "
                             f"({type(e).__name__}: {e})") from None
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    return _template_of_config(config.get("chat_template"), config_file)


def _template_of_config(template, config_file):
    """tokenizer_config.json's "chat_template" value as one template string, or None."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        # Several named templates (e.g. "default" and "tool_use"): a plain chat uses "default".
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f'{config_file}: "chat_template" lists no "default" template '
                         f"(names: {sorted(str(name) for name in named)})")
    raise ValueError(f'{config_file}: "chat_template" is a {type(template).__name__}, '
                     "expected a string or a list of named templates")


# ----------------------------------------------------------------------------- rendering

def _raise_exception(message):
    # Templates call raise_exception("...") to refuse a chat (e.g. roles that do not alternate).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the characters themselves.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return FIXED_NOW.strftime(format)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in the environment transformers renders chat templates in."""
    # A template comes from a downloaded folder: untrusted code. The immutable sandbox stops it
    # from reaching Python internals and from changing the messages it is given. trim_blocks and
    # lstrip_blocks drop the newline and indentation around {% %} tags, which templates rely on
    # (their whitespace is tokens); loopcontrols allows {% break %} and {% continue %}.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = False,
           bos_token: str | None = None, eos_token: str | None = None,
           date_string: str = DATE_STRING, **extra) -> str:
    """The text of messages in the chat template, as transformers' apply_chat_template(...,
    tokenize=False) renders it. add_generation_prompt=True ends the text with the header of an
    assistant turn, for the model to write the turn. bos_token and eos_token are the tokenizer's
    (as text); None leaves them undefined in the template, as for a tokenizer without one. extra
    are more template variables: tools, documents, or the tokenizer's other special tokens
    (pad_token, unk_token), which transformers also passes and templates hardly use. Raises
    ValueError when the template does not compile or refuses the chat."""
    variables = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                 "tools": None, "documents": None, "date_string": date_string, **extra}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return _compile(template).render(**variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- the messages

def check_messages(messages, need_assistant: bool = True):
    """Raises ValueError unless messages is a non-empty list of {"role", "content"} dicts with a
    role in ROLES and a string content, and (need_assistant) has an assistant turn after the
    first message. The messages name the index only: the caller knows the file and line."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    if not need_assistant:
        return
    if messages[0]["role"] == "assistant":
        # Its start is found by rendering the chat before it, and an empty chat renders nothing
        # the whole chat starts with (ChatML adds a default system turn; Llama's fails).
        raise ValueError("message 0: a chat to train on cannot start with an assistant turn "
                         "(put a system or user message before it)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train on")


# ----------------------------------------------------------------------------- tokens

@contextmanager
def _special_tokens_parsed(tokenizer):
    """The tokenizer reading "<|eot_id|>" in text as the special token, for the time being."""
    # data.py's QuoteTokenizer turns this off so that quotes stay text; a chat needs it on, since
    # the template writes its special tokens as text. It is put back as it was.
    was = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = False
    try:
        yield tokenizer
    finally:
        tokenizer.encode_special_tokens = was


def _encode(tokenizer, text):
    """The tokenizers Encoding of rendered chat text, as transformers tokenizes it: special tokens
    parsed, none added (the template wrote them)."""
    with _special_tokens_parsed(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)


def _assistant_spans(template, messages, text, bos_token, eos_token):
    """(message index, start, end): where each assistant turn lies in text, the whole chat
    rendered, as character offsets. Raises ValueError for a template whose rendering of the
    chat's start is not where the whole rendering starts."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], True, bos_token, eos_token)
        through = render(template, messages[:i + 1], False, bos_token, eos_token)
        if not (text.startswith(before) and text.startswith(through)
                and len(before) <= len(through)):
            raise ValueError(
                f"message {i}: the chat template renders the chat up to this turn differently "
                "from the start of the whole chat, so the assistant's tokens cannot be found")
        spans.append((i, len(before), len(through)))
    return spans


def _supervise_turn(encoding, start, end, eot_id, index, supervised):
    """Marks in supervised the tokens of one assistant turn: those overlapping the characters
    [start, end), up to and including the last eot_id among them. Raises ValueError when the
    turn has no eot_id."""
    # Overlapping, not inside: a token the tokenizer made of the header's last "\n" and the
    # content's first space belongs to both; transformers' assistant mask counts it in too.
    inside = [t for t, (s, e) in enumerate(encoding.offsets) if s < end and e > start]
    # The last: content may itself contain the end-of-turn text, which is parsed as the token.
    # What follows the template's end of turn (ChatML's "\n") is not the assistant's to say.
    ends = [t for t in inside if encoding.ids[t] == eot_id]
    if not ends:
        raise ValueError(f"message {index}: the chat template ends this assistant turn without "
                         f"the end-of-turn token (id {eot_id})")
    for t in range(inside[0], ends[-1] + 1):
        supervised[t] = 1


def chat_sample(tokenizer, template: str, messages: list[dict], bos_token: str | None,
                eos_token: str | None, eot_id: int,
                train_on_input: bool = False) -> tuple[list[int], list[int]]:
    """(ids, supervised) of one chat to train on. ids are the chat in its template, equal to
    transformers' apply_chat_template(messages, tokenize=True, date_string=DATE_STRING);
    supervised[i] is 1 where ids[i] is a target of the loss: the tokens of every assistant
    turn's content and of the eot_id that ends it (Llama-3.2: <|eot_id|>, SmolLM2: <|im_end|>).
    train_on_input=True makes every token a target but the first, which nothing before it
    predicts. tokenizer is a tokenizers.Tokenizer (tokenizer.json). Raises ValueError for bad
    messages (check_messages), a template that fails on them, one whose renderings of a chat's
    start are not prefixes of the whole chat's, or one that ends a turn without eot_id."""
    check_messages(messages, need_assistant=True)
    text = render(template, messages, False, bos_token, eos_token)
    spans = _assistant_spans(template, messages, text, bos_token, eos_token)
    encoding = _encode(tokenizer, text)
    ids = list(encoding.ids)
    if train_on_input:
        return ids, [0] + [1] * (len(ids) - 1)
    supervised = [0] * len(ids)
    for index, start, end in spans:
        _supervise_turn(encoding, start, end, eot_id, index, supervised)
    return ids, supervised


def generation_prompt(tokenizer, template: str, messages: list[dict], bos_token: str | None,
                      eos_token: str | None) -> list[int]:
    """The ids to prompt the model with so that it writes the next assistant turn: messages in
    the template with the assistant header after them, equal to transformers'
    apply_chat_template(messages, add_generation_prompt=True, date_string=DATE_STRING).
    Raises ValueError for bad messages or a template that fails on them."""
    check_messages(messages, need_assistant=False)
    text = render(template, messages, True, bos_token, eos_token)
    return list(_encode(tokenizer, text).ids)
