"""The model's own chat template: sandboxed rendering, HF semantics, errors as UsageError, BOS handling."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from parity.errors import UsageError
from parity.tokenize import chat_template as ct
from parity.tokenize.tokenizer import apply_template

GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] -%}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
META = {
    "tokenizer.chat_template": GEMMA,
    "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "x"],
    "tokenizer.ggml.bos_token_id": 2,
    "tokenizer.ggml.eos_token_id": 1,
}


def test_gemma_style_template_renders_with_system_and_generation_prompt() -> None:
    chat = ct.from_gguf(META)
    assert chat is not None and (chat.bos_token, chat.eos_token) == ("<bos>", "<eos>")
    out = chat.render(ct.messages_for("Hi there", "Be brief."))
    assert out == "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_auto_uses_the_gguf_template_and_strips_the_bos_the_tokenizer_adds() -> None:
    name, text, record = apply_template("auto", "Hi", None, META, Path("g.gguf"), add_bos=True)
    assert name == ct.GGUF_TEMPLATE and text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert record is not None and record["bos_stripped"] and record["source"] == "gguf"
    assert record["sha256"] == ct.ChatTemplate(GEMMA, "", "").sha256
    _, kept, rec2 = apply_template("auto", "Hi", None, META, Path("g.gguf"), add_bos=False)
    assert kept == "<bos>" + text and rec2 is not None and not rec2["bos_stripped"]


def test_named_templates_remain_for_models_without_one() -> None:
    meta = {k: v for k, v in META.items() if k != "tokenizer.chat_template"}
    assert apply_template("auto", "Hi", None, meta, Path("m.gguf"), add_bos=True)[:2] == (
        "instruct",
        "### Instruction:\nHi\n\n### Response:\n",
    )
    assert apply_template("raw", "Hi", None, META, Path("m.gguf"), add_bos=True) == ("raw", "Hi", None)


def test_hf_semantics_trim_blocks_tojson_strftime_generation_block() -> None:
    text = (
        "{% for m in messages %}\n  {% if m %}{{ m | tojson }}{% endif %}\n{% endfor %}{{ strftime_now('%Y-%m-%d') }}"
        "{% generation %}<{{ eos_token }}>{% endgeneration %}"
    )
    out = ct.render(text, [{"role": "user", "content": "<é>"}], eos_token="</s>", now=datetime(2024, 7, 26))
    assert out == '{"role": "user", "content": "<é>"}2024-07-26<</s>>'  # no HTML/ASCII escaping; blocks trimmed


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ raise_exception.__globals__ }}", "unsafe"),
        ("{{ strftime_now.__self__.__class__.__subclasses__() }}", "unsafe"),
        ("{{ cycler.__init__.__globals__.os.system('echo pwned') }}", "unsafe"),
        ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),
        (
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
            "System role not supported",
        ),
        ("{% for m in %}", "syntax error"),
        ("{{ messages[5]['content'] }}", "failed to render"),
    ],
)
def test_bad_templates_are_usage_errors_with_the_fix(template: str, match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        ct.render(template, ct.messages_for("hi", "sys"), name="tokenizer.chat_template")
    assert "--prompt-template instruct|raw" in str(info.value) and "tokenizer.chat_template" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback to print
