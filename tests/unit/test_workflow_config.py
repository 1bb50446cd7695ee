"""The implementations file: parsing, validation with suggestions, field rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.engines import spec as engine_spec
from parity.errors import UsageError
from parity.workflow import config

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[run]
steps = 12

[input]
program = ["push 1"]

[[implementation]]
name = "a"
role = "reference"
kind = "command"
options = { command = "python3 a.py" }

[[implementation]]
name = "b"
role = "alternate"
kind = "command"
options = { command = ["python3", "b.py"] }
"""


def parse(text: str) -> config.WindowsConfig:
    return config.parse(text, Path("/cfg/impls.toml"))


def test_examples_parse() -> None:
    vm = config.load(ROOT / "examples" / "windows" / "vm.toml")
    assert vm.reference.name == "vm-ref" and [a.name for a in vm.alternates] == ["vm-port"]
    assert not vm.llm and vm.run.end == 240 and vm.run.window == 6
    llm = config.load(ROOT / "examples" / "windows" / "llm.toml")
    assert llm.llm and llm.reference.kind == "llama"
    assert [i.kind for i in llm.implementations] == ["llama", "numpy", "command"]
    assert llm.rule("top_logits").tolerance(5.0) == pytest.approx(1e-3)
    assert llm.rule("logits_digest").mode == "ignore" and llm.rule("logits").optional
    assert llm.rule("top_ids").ties_within == "top_logits" and llm.rule("token").mode == "exact"


def test_minimal_defaults_and_command_string_split() -> None:
    cfg = parse(MINIMAL)
    assert cfg.run.start == 0 and cfg.run.end == 12 and cfg.run.window == config.DEFAULT_WINDOW
    assert cfg.reference.options["command"] == ["python3", "a.py"]
    assert len(cfg.sha256) == 64


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[run]", "[rn]"), "unknown key 'rn'.*did you mean 'run'"),
        (("steps = 12", "stpes = 12"), "unknown key 'stpes'.*did you mean 'steps'"),
        (('role = "alternate"', 'role = "reference"'), "2 reference implementations"),
        (('name = "b"', 'name = "a"'), "names must be unique; repeated: a"),
        (
            ('kind = "command"\noptions = { command = "python3 a.py" }', 'kind = "comand"'),
            "unknown kind 'comand'.*command",
        ),
        (('options = { command = "python3 a.py" }', "options = { comand = 1 }"), "did you mean 'command'"),
        (('options = { command = "python3 a.py" }', "options = {}"), "needs options.command"),
        (("steps = 12", "steps = 12\nend = 4"), "both steps and end"),
        (("steps = 12", "steps = 0"), "steps must be an integer >= 1"),
        (("steps = 12", "steps = 12\nwindow = 0"), "window must be an integer >= 1"),
        (('options = { command = ["python3", "b.py"] }', 'options = { command = ["x"], timeout = -1 }'), "timeout"),
    ],
)
def test_invalid_files_are_rejected_with_a_fix(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(MINIMAL.replace(*edit, 1))


def test_no_alternate_and_bad_toml() -> None:
    text = MINIMAL[: MINIMAL.index('[[implementation]]\nname = "b"')]
    with pytest.raises(UsageError, match="no alternate"):
        parse(text)
    with pytest.raises(UsageError, match="not valid TOML"):
        parse("[run\n")
    with pytest.raises(UsageError, match="not found"):
        config.load(Path("/nonexistent/impls.toml"))


def test_llm_engines_need_a_prompt() -> None:
    text = MINIMAL.replace('kind = "command"\noptions = { command = "python3 a.py" }', 'kind = "numpy"', 1)
    with pytest.raises(UsageError, match="LLM engines but \\[input\\] has no prompt"):
        parse(text)
    ok = parse(text.replace('program = ["push 1"]', 'prompt = "hi"'))
    assert ok.llm and ok.reference.kind == "numpy"


def test_field_rules() -> None:
    text = (
        MINIMAL
        + """
[fields]
pc = "exact"
regs = { abs = 0.5 }
"regs.flags" = "ignore"
ids = { ties_within = "vals" }
vals = { rel = 0.1, optional = true }
"""
    )
    cfg = parse(text)
    assert cfg.rule("regs.a").tolerance(1.0) == 0.5
    assert cfg.rule("regs.flags.z").mode == "ignore"
    assert cfg.rule("stack[3].tag").mode == "exact"
    assert cfg.rule("vals").tolerance(10.0) == pytest.approx(1.0) and cfg.rule("vals").optional
    assert cfg.rule("vals").describe() == "rel 0.1, optional"
    assert cfg.rule("ids").describe() == "exact (ties within vals may swap)"
    with pytest.raises(UsageError, match="is not exact, ignore or a table"):
        parse(MINIMAL + '[fields]\npc = "close"\n')
    with pytest.raises(UsageError, match="abs must be a finite number"):
        parse(MINIMAL + "[fields]\npc = { abs = -1 }\n")
    with pytest.raises(UsageError, match="names 'nope', which has no rule"):
        parse(MINIMAL + '[fields]\nids = { ties_within = "nope" }\n')
    with pytest.raises(UsageError, match="did you mean 'abs'"):
        parse(MINIMAL + "[fields]\npc = { ab = 1 }\n")


LLM = MINIMAL.replace('program = ["push 1"]', 'prompt = "hi"').replace(
    'kind = "command"\noptions = { command = "python3 a.py" }', 'kind = "llama"\noptions = { OPTIONS }', 1
)


def test_llm_options_are_the_spec_string_options() -> None:
    cfg = parse(LLM.replace("OPTIONS", 'type_k = "f16", flash_attn = "on", threads = 1, timeout = 30'))
    ref = cfg.reference
    assert ref.engine == engine_spec.parse("llama:type_k=f16,flash_attn=on,threads=1")  # timeout is the run's own
    assert ref.options == {"type_k": "f16", "flash_attn": "on", "threads": 1, "timeout": 30}  # recorded as written
    assert parse(LLM.replace("OPTIONS", "")).reference.engine == engine_spec.parse("llama")
    numpy = parse(
        LLM.replace('kind = "llama"\noptions = { OPTIONS }', 'kind = "numpy"\noptions = { dtype = "float64" }')
    )
    assert numpy.reference.engine.text == "numpy:dtype=float64"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('type_kk = "f16"', "unknown key 'type_kk'.*did you mean 'type_k'"),
        ('type_k = "f17"', "type_k='f17' is not valid.*type_k takes KV cache K type"),
        ('flash_attn = "yes"', "flash_attn='yes' is not valid.*on\\|off\\|auto"),
        ("threads = 0", "threads='0' is not valid.*positive integer"),
        ("flash_attn = true", "options.flash_attn = True is not valid.*on\\|off\\|auto"),
        ('eval_shape = "batch,type_k=f16"', "options.eval_shape = .* is not valid"),
        ("dtype = 'float64'", "unknown key 'dtype'"),
        ("timeout = 0", "timeout"),
    ],
)
def test_bad_llm_options_are_usage_errors_naming_them(options: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(LLM.replace("OPTIONS", options))


@pytest.mark.parametrize(
    ("kind", "options", "spec"),
    [
        ("cmd", 'argv = "./my-engine --threads 2", timeout = 30', "cmd:./my-engine --threads 2"),
        ("py", 'target = "pkg.mod:factory"', "py:pkg.mod:factory"),
        ("logits", 'path = "x.npz"', "logits:x.npz"),
    ],
)
def test_external_kinds_are_their_impl_specs(kind: str, options: str, spec: str) -> None:
    cfg = parse(LLM.replace('kind = "llama"\noptions = { OPTIONS }', f'kind = "{kind}"\noptions = {{ {options} }}'))
    assert cfg.reference.kind == kind and cfg.reference.engine == engine_spec.parse(spec)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("cmd", "", "kind cmd. needs options.argv"),
        ("cmd", "argv = ['a', 'b']", "needs options.argv"),
        ("cmd", 'argv = "\'unclosed"', "quote it as a shell would"),
        ("cmd", "arg = 'x'", "did you mean 'argv'"),
        ("py", "target = 'm:f', timeout = -1", "timeout"),
        ("logits", "path = 'x.npz', timeout = 5", "unknown key 'timeout'"),
    ],
)
def test_bad_external_options_are_usage_errors(kind: str, options: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(LLM.replace('kind = "llama"\noptions = { OPTIONS }', f'kind = "{kind}"\noptions = {{ {options} }}'))


def test_external_kinds_need_a_prompt() -> None:
    text = MINIMAL.replace(
        'kind = "command"\noptions = { command = "python3 a.py" }', 'kind = "cmd"\noptions = { argv = "e" }', 1
    )
    with pytest.raises(UsageError, match="LLM engines but \\[input\\] has no prompt"):
        parse(text)


def test_cmd_engine_example_parses() -> None:
    cfg = config.load(ROOT / "examples" / "windows" / "cmd_engine.toml")
    assert [(i.name, i.kind) for i in cfg.implementations] == [("llama", "llama"), ("echo", "cmd")]
    assert cfg.alternates[0].engine.kind == "cmd" and cfg.alternates[0].options["timeout"] == 120
