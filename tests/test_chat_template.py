"""machinery/chat.py: chats rendered in the model's own template, and the loss's targets.

The oracle is transformers: its AutoTokenizer.apply_chat_template gives the ids a chat must have.
Each check runs on both models: SmolLM2-135M-Instruct (ChatML, chat_template.jinja) and
Llama-3.2-1B-Instruct (Meta's template in tokenizer_config.json). Each tokenizer loads once.
"""
import json
import shutil
from datetime import datetime
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from machinery import chat
from machinery.chat import (DATE_STRING, chat_sample, generation_prompt, read_chat_template,
                            render)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["smollm2", "llama1b"])
def model(request):
    """One model folder: its raw tokenizer, transformers' tokenizer, template and tokens."""
    folder = request.getfixturevalue(f"{request.param}_dir")
    names = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Both folders name their end-of-turn token as eos: <|im_end|> and <|eot_id|>.
    return SimpleNamespace(
        name=request.param, folder=folder, tokenizer=tokenizer,
        hf=transformers.AutoTokenizer.from_pretrained(folder),
        template=read_chat_template(folder), bos=names["bos_token"], eos=names["eos_token"],
        eot_id=tokenizer.token_to_id(names["eos_token"]))


def sample(model, messages, **kwargs):
    return chat_sample(model.tokenizer, model.template, messages, model.bos, model.eos,
                       model.eot_id, **kwargs)


def hf_ids(model, messages, **kwargs):
    return model.hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        date_string=DATE_STRING, **kwargs)


def supervised_texts(model, ids, supervised):
    """The decoded runs of consecutive supervised tokens, in order."""
    runs, run = [], []
    for token, target in zip(ids + [None], supervised + [0]):
        if target:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [model.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CHATS = {
    "one turn": [user("What is LoRA?"), assistant("A low-rank update beside a frozen layer.")],
    "several turns": [user("Hi"), assistant("Hello! How can I help?"), user("Name a color."),
                      assistant("Blue."), user("Another?"), assistant("Green.")],
    "system": [system("You answer in one word."), user("Sky color?"), assistant("Blue"),
               user("Grass?"), assistant("Green")],
    "system then assistant": [system("Greet the user."), assistant("Good morning!")],
    "ends with a user turn": [user("Hi"), assistant("Hello."), user("Bye")],
    "two answers in a row": [user("Count."), assistant("One."), assistant("Two.")],
    "unicode": [user("Grüße! Was heißt 世界?"),
                assistant("世界 heißt „Welt“ 🌍 — naïve café.")],
    "multi-line": [user("A poem:\n\nplease"), assistant("Roses are red,\nviolets are blue.")],
}

# Text that looks like the templates' special tokens. transformers parses it in content as the
# special token itself (unless apply_chat_template(sanitize_control_tokens=True)), and so do we:
# an answer holding "<|eot_id|>" trains the model to end its turn there.
SPECIAL_TEXT = [user("Say <|eot_id|> or <|im_end|>, or <|im_start|>assistant"),
                assistant("Here: <|eot_id|> and <|im_end|> <|start_header_id|>!")]


# ----------------------------------------------------------------------------- ids

@pytest.mark.parametrize("name", [*CHATS, "special text"])
def test_ids_equal_transformers(model, name):
    messages = CHATS.get(name, SPECIAL_TEXT)
    ids, supervised = sample(model, messages)
    assert ids == hf_ids(model, messages)
    assert len(supervised) == len(ids)


@pytest.mark.parametrize("name", [*CHATS, "special text"])
def test_supervised_tokens_are_each_answer_and_its_end_of_turn(model, name):
    messages = CHATS.get(name, SPECIAL_TEXT)
    ids, supervised = sample(model, messages)
    answers = [m["content"] + model.eos for m in messages if m["role"] == "assistant"]
    assert supervised_texts(model, ids, supervised) == answers


def test_what_follows_the_end_of_turn_is_not_a_target(model):
    """ChatML writes "\n" after <|im_end|>: the model stops at <|im_end|>, never says the "\n"."""
    ids, supervised = sample(model, CHATS["one turn"])
    last = len(ids) - 1 if model.name == "llama1b" else len(ids) - 2
    assert ids[last] == model.eot_id and supervised[last] == 1
    assert supervised[last + 1:] == [0] * (len(ids) - 1 - last)


def test_content_special_text_becomes_special_tokens_as_in_transformers(model):
    ids, supervised = sample(model, SPECIAL_TEXT)
    in_answer = [t for t, s in zip(ids, supervised) if s]
    assert in_answer.count(model.eot_id) == 2  # the one in the answer, the one closing it


def test_the_first_token_is_never_a_target(model):
    ids, supervised = sample(model, CHATS["system then assistant"])
    assert supervised[0] == 0


def test_train_on_input_makes_every_token_but_the_first_a_target(model):
    ids, supervised = sample(model, CHATS["several turns"], train_on_input=True)
    assert ids == sample(model, CHATS["several turns"])[0]
    assert supervised == [0] + [1] * (len(ids) - 1)


def test_llama_trims_contents_smollm2_keeps_them(model):
    messages = [user("  Hi  "), assistant(" Hello. \n")]
    ids, supervised = sample(model, messages)
    assert ids == hf_ids(model, messages)
    said = "Hello." if model.name == "llama1b" else " Hello. \n"
    assert supervised_texts(model, ids, supervised) == [said + model.eos]


def test_a_token_across_the_turn_boundary_is_supervised(smollm2_dir):
    """ChatML's header ends in "\\n"; an answer starting with two spaces gives the token "\\n "
    that is half header, half answer. It is supervised, as in transformers' assistant mask."""
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    template = read_chat_template(smollm2_dir)
    ids, supervised = chat_sample(tokenizer, template, [user("Hi"), assistant("  Hi")],
                                  "<|im_start|>", "<|im_end|>", 2)
    first = supervised.index(1)
    assert tokenizer.id_to_token(ids[first]) == "ĊĠ"
    assert tokenizer.decode(ids[first:first + 3], skip_special_tokens=False) == "\n  Hi<|im_end|>"


def test_a_tokenizer_reading_special_text_as_text_is_put_back(model):
    model.tokenizer.encode_special_tokens = True  # as data.py's QuoteTokenizer leaves it
    try:
        assert sample(model, CHATS["one turn"])[0] == hf_ids(model, CHATS["one turn"])
        assert model.tokenizer.encode_special_tokens is True
    finally:
        model.tokenizer.encode_special_tokens = False


# ----------------------------------------------------------------------------- the prompt

@pytest.mark.parametrize("name", ["one turn", "system", "ends with a user turn", "unicode"])
def test_generation_prompt_equals_transformers(model, name):
    messages = CHATS[name]
    prompt = generation_prompt(model.tokenizer, model.template, messages, model.bos, model.eos)
    assert prompt == hf_ids(model, messages, add_generation_prompt=True)


def test_the_prompt_is_the_sample_up_to_its_last_answer(model):
    messages = CHATS["several turns"]
    ids, supervised = sample(model, messages)
    prompt = generation_prompt(model.tokenizer, model.template, messages[:-1], model.bos,
                               model.eos)
    last_answer = max(t for t in range(len(ids)) if supervised[t] and not supervised[t - 1])
    assert ids[:last_answer] == prompt


# ----------------------------------------------------------------------------- refusals

# Templates that render a chat's start differently from the whole chat: a turn count at the top,
# or only the last message. Their assistant turns cannot be found by rendering prefixes.
COUNTING = ("{{ messages | length }} turns\n{% for m in messages %}"
            "{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
LAST_ONLY = ("{{ messages[-1].role }}: {{ messages[-1].content }}<|im_end|>"
             "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("template", [COUNTING, LAST_ONLY], ids=["turn count", "last only"])
def test_a_template_not_rendering_prefixes_is_refused(smollm2_dir, template):
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"message 1: .* renders the chat up to this turn "
                                         r"differently from the start of the whole chat"):
        chat_sample(tokenizer, template, CHATS["one turn"], None, None, 2)


def test_a_template_without_the_end_of_turn_token_is_refused(smollm2_dir):
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"message 1: .* without the end-of-turn token \(id 2\)"):
        chat_sample(tokenizer, plain, CHATS["one turn"], None, None, 2)


@pytest.mark.parametrize("messages, error", [
    ([user("Hi"), {"role": "tool", "content": "42"}, assistant("Ok")],
     "message 1: role 'tool' is not one of system, user, assistant"),
    ([user("Hi"), {"content": "Ok"}], "message 1: role None is not one of"),
    ([user("Hi"), assistant(["Ok"])], "message 1: content must be a string"),
    ([user("Hi"), "Ok"], "message 1: expected an object with role and content"),
    ([user("Hi"), user("Anyone?")], "no assistant turn: nothing to train on"),
    ([], "messages must be a non-empty list"),
    ([assistant("Hello!"), user("Hi")], "message 0: a chat to train on cannot start with an "
                                        "assistant turn"),
])
def test_bad_messages_are_refused(model, messages, error):
    with pytest.raises(ValueError, match=error):
        sample(model, messages)


def test_a_template_refusing_the_chat_raises_value_error(model):
    refusing = "{{ raise_exception('Roles must alternate') }}"
    with pytest.raises(ValueError, match="chat template: TemplateError: Roles must alternate"):
        generation_prompt(model.tokenizer, refusing, [user("Hi")], None, None)


# ----------------------------------------------------------------------------- the date

def test_llama_renders_the_fixed_date_whatever_the_day(llama1b_dir, monkeypatch):
    """transformers without date_string writes today's date; we write DATE_STRING every day."""
    class In2031(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2031, 3, 14)

    template = read_chat_template(llama1b_dir)
    hf = transformers.AutoTokenizer.from_pretrained(llama1b_dir)
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", In2031)
    monkeypatch.setattr(chat, "datetime", In2031)
    assert "Today Date: 14 Mar 2031" in hf.apply_chat_template(CHATS["one turn"], tokenize=False)
    text = render(template, CHATS["one turn"], bos_token="<|begin_of_text|>")
    assert "Today Date: 26 Jul 2024\n" in text
    assert text == hf.apply_chat_template(CHATS["one turn"], tokenize=False,
                                          date_string="26 Jul 2024")


def test_date_string_is_the_templates_own_fallback_and_can_be_changed(llama1b_dir):
    template = read_chat_template(llama1b_dir)
    assert '{%- set date_string = "26 Jul 2024" %}' in template
    assert "Today Date: 01 Jan 2025\n" in render(template, CHATS["one turn"],
                                                 date_string="01 Jan 2025")


def test_strftime_now_formats_the_fixed_day():
    assert render("{{ strftime_now('%d %b %Y') }}", []) == DATE_STRING


# ----------------------------------------------------------------------------- the environment

# Whitespace around tags, loop controls, tojson, namespace and undefined tokens, rendered by both.
ENVIRONMENT = """{{ bos_token }}{% for m in messages %}
    {% if loop.index > 2 %}{% break %}{% endif %}
    {% set ns = namespace(n=loop.index) %}
  [{{ ns.n }}] {{ m | tojson }} {{ m.content | tojson(indent=2) }}
{% endfor %}{{ eos_token }}|{{ tools is none }}|{{ date_string }}
"""


def test_the_environment_renders_as_transformers(model):
    messages = [user('<b>"café"</b> & 世界'), assistant("x"), user("never rendered")]
    ours = render(ENVIRONMENT, messages, bos_token=model.bos, eos_token=model.eos)
    assert ours == model.hf.apply_chat_template(messages, chat_template=ENVIRONMENT,
                                                tokenize=False, date_string=DATE_STRING)


def test_the_sandbox_keeps_templates_from_python_and_from_changing_messages():
    with pytest.raises(ValueError, match="SecurityError"):
        render("{{ messages.append(1) }}", [user("Hi")])
    with pytest.raises(ValueError, match="SecurityError"):
        render("{{ ''.__class__.__mro__ }}", [])


# ----------------------------------------------------------------------------- the template file

def test_the_template_read_is_transformers_own(model):
    assert model.template == model.hf.chat_template


def test_no_template_gives_none(tmp_path, llama1b_dir):
    assert read_chat_template(tmp_path) is None
    config = json.loads((llama1b_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path) is None


def test_the_jinja_file_comes_before_the_config(tmp_path, llama1b_dir):
    shutil.copy(llama1b_dir / "tokenizer_config.json", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert read_chat_template(tmp_path) == "{{ messages[0].content }}"


def test_a_list_of_templates_gives_the_default(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(tmp_path) == "D"


@pytest.mark.parametrize("text, error", [
    ("{not json", "not readable JSON"),
    ('{"chat_template": 3}', '"chat_template" is a int, expected a string or a list'),
    ('{"chat_template": [{"name": "tool_use", "template": "T"}]}',
     "lists no \"default\" template \\(names: \\['tool_use'\\]\\)"),
    ("[1]", "not a JSON object"),
])
def test_an_unreadable_config_names_the_file(tmp_path, text, error):
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match=error) as raised:
        read_chat_template(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "tokenizer_config.json"))
    assert "\n" not in str(raised.value)


def test_an_unreadable_jinja_file_names_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match="chat_template.jinja: cannot read the chat template"):
        read_chat_template(tmp_path)
