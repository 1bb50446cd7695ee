"""Implementation spec strings (parity.engines.spec) and how a bridged spec sets context parameters."""

from __future__ import annotations

import pytest

from parity.backends.bridge import BackendParams
from parity.engines import spec
from parity.engines.bridged import apply_spec
from parity.errors import UsageError


def test_plain_kinds() -> None:
    for kind in ("numpy", "llama", "bitnet"):
        s = spec.parse(kind)
        assert (s.kind, s.options, s.text, s.label) == (kind, (), kind, kind)
    assert spec.parse("llama").bridged and not spec.parse("numpy").bridged


def test_options_keep_their_order_and_name_the_lane() -> None:
    s = spec.parse("llama:type_k=f16,flash_attn=on")
    assert s.options == (("type_k", "f16"), ("flash_attn", "on"))
    assert s.text == "llama:type_k=f16,flash_attn=on" and s.label == "llama-type_k-f16-flash_attn-on"
    assert spec.parse("numpy:dtype=float64").get("dtype") == "float64"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("vulkan", "unknown implementation"),
        ("llama:typek=f16", "has no option 'typek'"),
        ("llama:type_k", "is not key=value"),
        ("llama:type_k=f17", "type_k='f17' is not valid"),
        ("llama:threads=0", "threads='0' is not valid"),
        ("llama:flash_attn=yes", "flash_attn='yes' is not valid"),
        ("numpy:dtype=float16", "dtype='float16' is not valid"),
        ("numpy:type_k=f16", "numpy has no option 'type_k'"),
        ("llama:type_k=f16,type_k=f32", "given twice"),
    ],
)
def test_bad_specs_are_usage_errors_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(UsageError, match=says) as info:
        spec.parse(text)
    assert info.value.exit_code == 2 and info.value.fix


def test_apply_spec_sets_only_what_the_spec_names() -> None:
    base = BackendParams(n_ctx=128, n_threads=2, n_batch=128, n_ubatch=128, type_k=0, type_v=0, flash_attn=0)
    assert apply_spec(spec.parse("llama"), base) == base
    p = apply_spec(spec.parse("llama:type_k=f16,type_v=q8_0,flash_attn=auto,threads=1,n_ubatch=32"), base)
    assert (p.type_k, p.type_v, p.flash_attn, p.n_threads, p.n_ubatch) == (1, 8, -1, 1, 32)
    assert (p.n_ctx, p.n_batch) == (128, 128)


def test_source_option_names_a_build_and_a_file_safe_lane() -> None:
    s = spec.parse("llama:source=/home/me/llama.cpp-patched/")
    assert s.plan_key == "llama@/home/me/llama.cpp-patched/" and spec.parse("llama").plan_key == "llama"
    assert s.label.startswith("llama-source-llama.cpp-patched-") and "/" not in s.label
    assert apply_spec(s, BackendParams()) == BackendParams()  # a source is a build, not a context parameter
