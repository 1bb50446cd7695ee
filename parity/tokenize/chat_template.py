"""A model's own chat template (GGUF `tokenizer.chat_template`), rendered in a Jinja2 sandbox.

Rendering follows HF transformers' `apply_chat_template` (and llama.cpp's Jinja path): an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension, a
`{% generation %}` block that only renders its body, the globals `raise_exception` and `strftime_now`, a
`tojson` filter that does not HTML-escape, and the variables `messages`, `add_generation_prompt`,
`bos_token` and `eos_token` (`tools` is left undefined, as llama.cpp does without tools). An unsafe
attribute (`__class__`, a function's `__globals__`) raises; a template is never executed outside the sandbox.

BOS: a template that writes `bos_token` itself would give two BOS tokens once the tokenizer adds its own
(both llama.cpp's `llama_tokenize(add_special)` and HF's `encode` do). As llama.cpp's
`common_chat_templates_apply` does, a leading BOS text is stripped from the render when the vocabulary
adds a BOS (`add_bos`); the prompt is then tokenized with special tokens added, like every other template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from parity.errors import UsageError

GGUF_TEMPLATE = "gguf-chat-template"
GGUF_KEY = "tokenizer.chat_template"
FIX = "--prompt-template instruct|raw"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token strings it is rendered with."""

    text: str
    bos_token: str
    eos_token: str
    source: str = "gguf"
    name: str = GGUF_KEY

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self, *, bos_stripped: bool) -> dict[str, Any]:
        """The receipt's `chat_template` field."""
        return {
            "source": self.source,
            "key": self.name,
            "sha256": self.sha256,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "bos_stripped": bos_stripped,
        }

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        now: datetime | None = None,
    ) -> str:
        """The rendered conversation; any failure is a UsageError naming the template, never a traceback."""
        return render(
            self.text,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            name=self.name,
            now=now,
        )


def from_gguf(metadata: Mapping[str, Any]) -> ChatTemplate | None:
    """The GGUF's chat template with its BOS/EOS strings, or None when it carries none."""
    text = metadata.get(GGUF_KEY)
    if not isinstance(text, str) or not text.strip():
        return None
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = metadata.get(key)
        return str(tokens[int(i)]) if isinstance(i, int) and 0 <= i < len(tokens) else ""

    return ChatTemplate(text, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def messages_for(prompt: str, system: str | None) -> list[dict[str, str]]:
    """The conversation parity renders: an optional system message, then the user prompt."""
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


def strip_bos(text: str, bos_token: str, add_bos: bool) -> tuple[str, bool]:
    """Drop a leading BOS text when the tokenizer adds BOS itself (llama.cpp's rule); returns (text, stripped)."""
    if add_bos and bos_token and text.startswith(bos_token):
        return text[len(bos_token) :], True
    return text, False


class TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _environment() -> Any:
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        """HF's sandbox, except that an unsafe attribute raises at once instead of rendering as undefined."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders the body."""

        tags = {"generation"}  # noqa: RUF012 - jinja2's API

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise TemplateRaised(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render(
    text: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    name: str = GGUF_KEY,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Render `text` in the sandbox as HF's apply_chat_template does (strftime_now uses `now`, default now)."""
    import jinja2
    from jinja2.exceptions import SecurityError

    clock = now or datetime.now()
    env = _environment()
    env.globals["strftime_now"] = clock.strftime
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    label = f"chat template {name} (sha256 {sha})"
    try:
        compiled = env.from_string(text)
        return str(
            compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **(extra or {}),
            )
        )
    except TemplateRaised as exc:
        raise UsageError(f"{label} refused the conversation: {exc}", fix=FIX) from None
    except SecurityError as exc:
        raise UsageError(f"{label} tried an unsafe operation (sandbox): {exc}", fix=FIX) from None
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"{label} has a syntax error at line {exc.lineno}: {exc.message}", fix=FIX) from None
    except Exception as exc:  # a template is untrusted input: whatever it raises is the template's fault
        raise UsageError(f"{label} failed to render: {type(exc).__name__}: {exc}", fix=FIX) from None
