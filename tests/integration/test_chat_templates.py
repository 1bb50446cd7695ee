"""Every chat template the pinned llama.cpp vendors (models/templates/*.jinja), rendered in parity's sandbox and
compared with llama.cpp's own built-in formatter (llama_chat_apply_template, through the bridge).

The templates are found through parity's backend plan (the acquired pinned source), never a hard-coded path.
llama.cpp's built-in formatter is a fixed-format approximation keyed on markers in the template: it returns
-1 for templates it does not recognise (skipped here, counted), and for the ones listed in LEGACY_DIFFERS it
knowingly produces something other than the Jinja semantics (default system preambles, reasoning prefixes,
whitespace); each entry says why. A listed template that starts to match fails the test, so the list stays true.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from parity.backends import build, lock
from parity.backends.worker import Worker
from parity.compare import receipts
from parity.errors import ParityError, UsageError
from parity.tokenize import chat_template as ct
from tests.integration.conftest import locked_gemma, run_cli

USER = "What is the capital of France? Answer in one word."
SYSTEM = "You are a terse geography assistant."
MESSAGES = ct.messages_for(USER, SYSTEM)
NOW = datetime(2024, 7, 26)  # strftime_now: a fixed clock so renders are reproducible
BOS, EOS = "<s>", "</s>"

# Templates that refuse this conversation with a clear UsageError (the reason must appear in it).
REJECTS = {
    "google-gemma-2-2b-it.jinja": "System role not supported",  # raise_exception: Gemma 2 has no system turn
    "fireworks-ai-llama-3-firefunction-v2.jinja": "'functions' is undefined",  # needs its `functions` variable
}

_PREAMBLE = "the template adds a default system preamble / metadata the built-in formatter omits"
_THINK = "the template opens a reasoning block (<think>...) in the generation prompt; the built-in formatter does not"
# llama.cpp's built-in formatter differs from the template's own (Jinja) rendering, by design.
LEGACY_DIFFERS = {
    "Cohere2MoE.jinja": _PREAMBLE + " (safety preamble)",
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": _PREAMBLE + " (tool-use preamble)",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": _PREAMBLE + " (system preamble)",
    "HuggingFaceTB-SmolLM3-3B.jinja": _PREAMBLE + " (## Metadata, reasoning mode)",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": _PREAMBLE + " (function-calling system prompt)",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": _PREAMBLE + " (function-calling system prompt)",
    "meetkai-functionary-medium-v3.1.jinja": _PREAMBLE + " (Cutting Knowledge Date turn)",
    "meetkai-functionary-medium-v3.2.jinja": _PREAMBLE + " (function definitions turn)",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": _PREAMBLE + " (Cutting Knowledge Date / Today Date)",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": _PREAMBLE + " (Cutting Knowledge Date / Today Date)",
    "meta-llama-Llama-3.3-70B-Instruct.jinja": _PREAMBLE + " (Cutting Knowledge Date / Today Date)",
    "openai-gpt-oss-120b.jinja": _PREAMBLE + " (system message; the user's system prompt becomes a developer turn)",
    "unsloth-Apriel-1.5.jinja": _PREAMBLE + " (reasoning instructions prepended to the system prompt)",
    "upstage-Solar-Open-100B.jinja": _PREAMBLE + " (provider system prompt)",
    "inclusionai-ling-3.0-flash.jinja": _PREAMBLE + " ('detailed thinking on') and opens <think>",
    "GLM-4.7-Flash.jinja": _THINK + "; no newline after the role tags either",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja": _THINK,
    "Qwen-QwQ-32B.jinja": _THINK,
    "Qwen3.5-4B.jinja": _THINK,
    "StepFun3.5-Flash.jinja": _THINK,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "deepseek-ai-DeepSeek-V3.1.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "deepseek-ai-DeepSeek-V3.2.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "deepseek-ai-DeepSeek-V4-Flash-0731.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "deepseek-ai-DeepSeek-V4.jinja": _THINK + "; built-in 'deepseek3' puts \\n\\n after the system",
    "llama-cpp-deepseek-r1.jinja": _THINK + "; the template ends the user turn with <｜end▁of▁sentence｜>",
    "GLM-4.6.jinja": "built-in 'chatglm4' appends a newline after <|assistant|>; the template does not",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": "built-in 'mistral-v7' puts a space after [SYSTEM_PROMPT]/[INST]",
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": "built-in 'mistral-v7' puts a space after [SYSTEM_PROMPT]/[INST]",
    "unsloth-mistral-Devstral-Small-2507.jinja": "built-in 'mistral-v7' puts a space after [SYSTEM_PROMPT]/[INST]",
}
MIN_EQUAL = 19  # measured: 19 of the pinned templates render exactly as llama.cpp's built-in formatter does


def _template_dir() -> Path:
    """models/templates of the pinned llama.cpp source, acquired through parity's own backend plan."""
    spec = lock.get_spec("llama")
    return lock.acquire(spec, lock.source_override(spec)).path / "models" / "templates"


def _template_names() -> list[str]:
    try:
        return sorted(p.name for p in _template_dir().glob("*.jinja")) or ["<no templates found>"]
    except ParityError as exc:  # no source and no network: every test below fails with the reason
        return [f"<source unavailable: {exc}>"]


TEMPLATES = _template_names()


def _read(name: str) -> str:
    path = _template_dir() / name
    if not path.is_file():
        pytest.fail(f"template {name} not found under {_template_dir()}")
    return path.read_text(encoding="utf-8")


def _render(name: str) -> str:
    return ct.render(_read(name), MESSAGES, bos_token=BOS, eos_token=EOS, name=name, now=NOW)


@pytest.fixture(scope="module")
def builtin(llama_plan: build.BuildPlan) -> dict[str, str | None]:
    """llama.cpp's built-in rendering of every template (None: not recognised), from one worker."""
    with Worker("llama", llama_plan.bridge_path) as w:
        return {n: w.call("chat_apply_template", _read(n), MESSAGES, True) for n in TEMPLATES}


def test_enough_templates_are_vendored() -> None:
    assert len(TEMPLATES) >= 60, TEMPLATES


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_renders_in_the_sandbox(name: str) -> None:
    if name in REJECTS:
        with pytest.raises(UsageError, match=REJECTS[name]) as info:
            _render(name)
        assert name in str(info.value) and "--prompt-template instruct|raw" in str(info.value)
        return
    out = _render(name)
    assert USER in out, out
    assert out == _render(name), "rendering must be deterministic"


@pytest.mark.compile
@pytest.mark.parametrize("name", TEMPLATES)
def test_template_matches_llama_cpp_builtin_formatter(name: str, builtin: dict[str, str | None]) -> None:
    theirs = builtin[name]
    if theirs is None or name in REJECTS:
        assert name not in LEGACY_DIFFERS, f"{name} is listed in LEGACY_DIFFERS but llama.cpp does not format it"
        return  # llama.cpp's built-in formatter does not know this template (-1): nothing to compare
    ours, _ = ct.strip_bos(_render(name), BOS, add_bos=True)  # llama.cpp's formatter never writes the BOS
    if name in LEGACY_DIFFERS:
        assert ours != theirs, f"{name} now matches llama.cpp: remove it from LEGACY_DIFFERS"
        assert USER in theirs
        return
    assert ours == theirs


@pytest.mark.compile
def test_most_recognised_templates_match_exactly(builtin: dict[str, str | None]) -> None:
    recognised = [n for n, t in builtin.items() if t is not None and n not in REJECTS]
    equal = [n for n in recognised if ct.strip_bos(_render(n), BOS, add_bos=True)[0] == builtin[n]]
    report = f"{len(TEMPLATES)} templates, {len(recognised)} recognised by llama.cpp, {len(equal)} equal: {equal}"
    print(report)
    assert len(equal) >= MIN_EQUAL, report
    assert len(equal) + len(LEGACY_DIFFERS) == len(recognised), report


@pytest.mark.compile
def test_bridge_formatter_basics(llama_plan: build.BuildPlan) -> None:
    with Worker("llama", llama_plan.bridge_path) as w:
        assert w.call("chat_apply_template", "chatml", MESSAGES, True) == (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert w.call("chat_apply_template", "{{ nothing_llama_cpp_knows }}", MESSAGES, True) is None
        long = [{"role": "user", "content": "x" * 5000}]  # larger than the first buffer guess
        assert (
            w.call("chat_apply_template", "gemma", long, False) == f"<start_of_turn>user\n{'x' * 5000}<end_of_turn>\n"
        )


# --- the real thing: Gemma 3 270M with --prompt-template auto ------------------------------------------------
# The locked file is the base model (google/gemma-3-270m) and carries no tokenizer.chat_template, so `auto` is
# right to fall back to instruct for it. The test adds the instruction-tuned model's template (google/gemma-3-270m-it,
# tokenizer_config.json) to a copy of it: the same weights and vocabulary, as the -it GGUFs ship it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def _with_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the GGUF `src` with `tokenizer.chat_template` set (every other key and tensor unchanged)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", ct.GGUF_KEY):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_chat_template(template)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def test_gemma3_template_renders_like_llama_cpp_gemma_format() -> None:
    """The Gemma 3 template (system folded into the first user turn) in the sandbox, llama.cpp's way."""
    out = ct.render(GEMMA3_CHAT_TEMPLATE, MESSAGES, bos_token="<bos>", eos_token="<eos>")
    assert out == f"<bos><start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.compile
@pytest.mark.model
def test_gemma_auto_renders_its_own_chat_template(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    base = locked_gemma()
    from parity.gguf.reader import open_gguf

    assert open_gguf(base).get(ct.GGUF_KEY) is None  # the locked base model: see the next test
    model = _with_chat_template(base, tmp_path / "gemma-3-270m-chat.gguf", GEMMA3_CHAT_TEMPLATE)
    proc = run_cli(
        "run",
        "--model-gguf",
        str(model),
        "--prompt-template",
        "auto",
        "--system-prompt",
        "Answer briefly.",
        "--prompt",
        "Name a primary colour.",
        "--max-tokens",
        "1",
        "--out-dir",
        str(tmp_path / "out"),
        "--format",
        "json",
    )
    # 0 or 1 (a Q4_K_M model may miss the default tolerance), never 2: template and token parity went through
    assert proc.returncode in (0, 1), proc.stderr
    receipt = json.loads((tmp_path / "out" / "receipt_llama.json").read_text())
    assert receipt["prompt_template"] == ct.GGUF_TEMPLATE
    formatted = receipt["formatted_prompt"]
    assert formatted.startswith("<start_of_turn>user\nAnswer briefly.\n\nName a primary colour.<end_of_turn>\n")
    assert formatted.endswith("<start_of_turn>model\n") and "### Instruction" not in formatted
    rec = receipt["chat_template"]
    assert rec["source"] == "gguf" and rec["bos_token"] == "<bos>" and rec["bos_stripped"] is True
    gguf = open_gguf(model)
    assert rec["sha256"] == ct.ChatTemplate(gguf.get(ct.GGUF_KEY), "", "").sha256
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    ids = receipt["token_ids"]
    assert ids[0] == bos and ids[1] != bos, f"Gemma's ids must begin with exactly one BOS: {ids[:4]}"
    summary = json.loads(proc.stdout)
    assert summary["prompt_template"] == ct.GGUF_TEMPLATE and summary["chat_template"]["sha256"] == rec["sha256"]
    assert receipts.validation_errors(receipt) == []
    assert receipts.validation_errors({**receipt, "chat_template": {"source": "gguf", "sha256": "x"}})


@pytest.mark.compile
@pytest.mark.parametrize(
    ("template", "says"),
    [("{{ ''.__class__.__mro__ }}", "unsafe"), ("{{ raise_exception('no chat here') }}", "no chat here")],
)
def test_a_failing_template_exits_2_with_the_fix(
    llama_plan: build.BuildPlan, tmp_path: Path, template: str, says: str
) -> None:
    from parity.models.modelgen import default_model

    gguf_path, tok = default_model("f32")
    model = _with_chat_template(gguf_path, tmp_path / "bad-template.gguf", template)
    proc = run_cli("run", "--model-gguf", str(model), "--tokenizer", str(tok), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr
    assert "tokenizer.chat_template" in proc.stderr and "--prompt-template instruct|raw" in proc.stderr
    assert not (tmp_path / "out" / "receipt_llama.json").exists()


@pytest.mark.compile
@pytest.mark.parametrize("name", ["gemma", "chatml", "llama3-chat"])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_named_templates_equal_llama_cpp_builtins(llama_plan: build.BuildPlan, name: str, system: str | None) -> None:
    """The named templates `auto` picks from vocabulary markers are llama.cpp's built-in formatters, exactly."""
    from parity.tokenize.tokenizer import format_prompt

    builtin = {"gemma": "gemma", "chatml": "chatml", "llama3-chat": "llama3"}[name]
    with Worker("llama", llama_plan.bridge_path) as w:
        theirs = w.call("chat_apply_template", builtin, ct.messages_for(USER, system), True)
    assert format_prompt(name, USER, system) == theirs


@pytest.mark.compile
@pytest.mark.model
def test_gemma_base_model_auto_uses_its_turn_markers(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """The locked Gemma 3 270M has no chat template but its vocabulary defines <start_of_turn>/<end_of_turn>:
    `auto` formats the prompt in the model's own turns, not in a format it never saw."""
    proc = run_cli(
        "run",
        "--model-gguf",
        str(locked_gemma()),
        "--prompt-template",
        "auto",
        "--max-tokens",
        "1",
        "--out-dir",
        str(tmp_path),
        "--format",
        "json",
    )
    assert proc.returncode in (0, 1), proc.stderr  # a Q4_K_M model may miss the default tolerance, never exit 2
    receipt = json.loads((tmp_path / "receipt_llama.json").read_text())
    assert receipt["prompt_template"] == "gemma" and receipt["chat_template"] is None
    assert receipt["formatted_prompt"] == "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    assert receipts.validation_errors(receipt) == []
