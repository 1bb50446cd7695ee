"""Fuzzing the GGUF reader and every pre-flight check (issue 11): mutated files end in parity's own errors.

Each example mutates the default model in one of the ways a damaged or hostile file differs from a good
one (byte flips in the header/KV region, value type tags, length fields, truncation, count fields set to
0 or huge, values swapped between keys, tensor offsets and types) and runs it through `inputs.check_input`,
exactly what `parity run` does before any lane starts. Allowed outcomes: the file passes, or a ParityError
with exit code 2 and a one-line message. Not allowed: any other exception, a hang (SIGALRM), or a large
allocation (tracemalloc; a declared length is checked against the file before anything is read).

Hypothesis runs derandomized (a fixed seed), so CI sees the same cases on every job.
"""

from __future__ import annotations

import functools
import signal
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from gguf.constants import GGUFValueType
from gguf.gguf_reader import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import options
from parity.check import inputs
from parity.errors import ParityError
from parity.models import modelgen

CASE_SECONDS = 5  # one case taking longer than this is a hang
PEAK_BYTES = 64 << 20  # Python allocations of one case (the default model's pipeline peaks near 6 MB)
FUZZ = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Layout:
    """Where the fields of the base file are: every offset a mutation may target."""

    data: bytes
    data_offset: int  # start of the tensor data section
    kv: list[tuple[int, int, int]]  # per key: (type tag offset, value offset, value end)
    lengths: list[int]  # offsets of u64 length fields (key names, string values, array counts, tensor names)
    counts: list[tuple[int, int]]  # (offset, size in bytes) of count fields: tensor/kv counts, n_dims, dims
    elem_types: list[int]  # offsets of array element type tags
    tensor_types: list[int]  # offsets of tensor ggml type ids (u32)
    tensor_offsets: list[int]  # offsets of tensor data offsets (u64)


def _layout(path: Path) -> Layout:
    data = path.read_bytes()
    r = GGUFReader(path)
    kv, lengths, elem_types = [], [], []
    counts = [(8, 8), (16, 8)]
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        start = field.offset
        klen = struct.unpack_from("<Q", data, start)[0]
        lengths.append(start)
        tag = start + 8 + klen
        value = tag + 4
        size = sum(int(p.nbytes) for p in field.parts) - (8 + klen + 4)
        kv.append((tag, value, value + size))
        if field.types[0] == GGUFValueType.STRING:
            lengths.append(value)
        elif field.types[0] == GGUFValueType.ARRAY:
            elem_types.append(value)
            lengths.append(value + 4)
            if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
                pos = value + 12
                for _ in range(min(int(field.parts[1][0]), 8)):  # the first few element lengths
                    lengths.append(pos)
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    tensor_types, tensor_offsets = [], []
    for t in r.tensors:
        start = t.field.offset
        nlen = struct.unpack_from("<Q", data, start)[0]
        lengths.append(start)
        n_dims_at = start + 8 + nlen
        n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
        counts.append((n_dims_at, 4))
        counts.extend((n_dims_at + 4 + 8 * j, 8) for j in range(n_dims))
        tensor_types.append(n_dims_at + 4 + 8 * n_dims)
        tensor_offsets.append(n_dims_at + 4 + 8 * n_dims + 4)
    return Layout(data, int(r.data_offset), kv, lengths, counts, elem_types, tensor_types, tensor_offsets)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    model = modelgen.generate("f32", tmp_path_factory.mktemp("base"))
    return _layout(model.gguf_path)


@pytest.fixture(scope="module")
def case_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # no tokenizer.json beside it: the GGUF's own vocabulary is exported, so the exporter is fuzzed too
    return tmp_path_factory.mktemp("case") / "mutant.gguf"


U64 = st.sampled_from([0, 1, 2, 3, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])


def _put(data: bytearray, at: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if at + size <= len(data):
        data[at : at + size] = struct.pack(fmt, value % (1 << (8 * size)))


Mutation = Callable[[bytearray], bytearray]


@st.composite
def mutations(draw: st.DrawFn, lay: Layout) -> tuple[str, Mutation]:
    """One mutation of the base file: (description, function)."""
    kind = draw(
        st.sampled_from(
            [
                "flip",
                "type_tag",
                "elem_type",
                "length",
                "truncate",
                "count",
                "swap_values",
                "copy_value",
                "tensor_type",
                "tensor_offset",
                "value_bytes",
            ]
        )
    )
    head_end = lay.data_offset
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, head_end - 1), st.integers(1, 255)), min_size=1, max_size=4))

        def flip(d: bytearray) -> bytearray:
            for at, x in flips:
                d[at] ^= x
            return d

        return f"flip {flips}", flip
    if kind in ("type_tag", "elem_type"):
        at = (
            draw(st.sampled_from([t for t, _, _ in lay.kv]))
            if kind == "type_tag"
            else draw(st.sampled_from(lay.elem_types))
        )
        tag = draw(st.one_of(st.integers(0, 13), st.sampled_from([2**31, 2**32 - 1])))
        return f"{kind} at {at} = {tag}", lambda d: (_put(d, at, "<I", tag), d)[1]
    if kind == "length":
        at = draw(st.sampled_from(lay.lengths))
        old = struct.unpack_from("<Q", lay.data, at)[0]
        value = draw(st.one_of(U64, st.integers(max(old - 3, 0), old + 3)))
        return f"length at {at} = {value}", lambda d: (_put(d, at, "<Q", value), d)[1]
    if kind == "truncate":
        cut = draw(st.one_of(st.integers(0, head_end + 64), st.integers(0, len(lay.data) - 1)))
        return f"truncate at {cut}", lambda d: d[:cut]
    if kind == "count":
        at, size = draw(st.sampled_from(lay.counts))
        value = draw(U64)
        return f"count at {at} = {value}", lambda d: (_put(d, at, "<Q" if size == 8 else "<I", value), d)[1]
    if kind in ("swap_values", "copy_value"):
        (ta, _va, ea), (tb, _vb, eb) = draw(st.lists(st.sampled_from(lay.kv), min_size=2, max_size=2, unique=True))

        def swap(d: bytearray) -> bytearray:
            # the tag and value of key B take the place of key A's (and A's of B's for a swap)
            a, b = bytes(d[ta:ea]), bytes(d[tb:eb])
            if kind == "copy_value":
                return d[:ta] + b + d[ea:]
            first, second = ((ta, ea, b), (tb, eb, a)) if ta < tb else ((tb, eb, a), (ta, ea, b))
            return d[: first[0]] + first[2] + d[first[1] : second[0]] + second[2] + d[second[1] :]

        return f"{kind} {ta}<->{tb}", swap
    if kind == "tensor_type":
        at = draw(st.sampled_from(lay.tensor_types))
        value = draw(st.one_of(st.integers(0, 42), st.sampled_from([2**31, 2**32 - 1])))
        return f"tensor type at {at} = {value}", lambda d: (_put(d, at, "<I", value), d)[1]
    if kind == "tensor_offset":
        at = draw(st.sampled_from(lay.tensor_offsets))
        old = struct.unpack_from("<Q", lay.data, at)[0]
        value = draw(st.one_of(U64, st.integers(max(old - 64, 0), old + 64)))
        return f"tensor offset at {at} = {value}", lambda d: (_put(d, at, "<Q", value), d)[1]
    # value_bytes: a scalar value (u32/f32) set to a boundary pattern: 0, -1, NaN, inf, huge
    _, va, ea = draw(st.sampled_from([k for k in lay.kv if k[2] - k[1] in (1, 4, 8)]))
    pattern = draw(st.sampled_from([b"\x00", b"\xff", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x01"]))
    return f"value at {va} = {pattern!r}", lambda d: d[:va] + (pattern * 8)[: ea - va] + d[ea:]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"a case ran longer than {CASE_SECONDS} s")


@functools.cache
def _options() -> options.RunOptions:
    return options.resolve({})  # once: resolving reads pyproject.toml, not part of what a case checks


def check_case(path: Path, data: bytes, what: str) -> str:
    """Run the pre-flight on one mutant; returns "pass" or the error line. Fails on anything else."""
    path.write_bytes(data)
    opts = _options()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        inputs.check_input(opts, ["llama"], path, None)
        return "pass"
    except ParityError as exc:
        assert exc.exit_code == 2, f"{what}: {type(exc).__name__} exits {exc.exit_code}: {exc}"
        line = str(exc)
        assert "\n" not in line, f"{what}: a multi-line message: {line!r}"
        return line
    except Hang:
        pytest.fail(f"{what}: hang (over {CASE_SECONDS} s)")
    except Exception as exc:  # the bug this test exists for
        pytest.fail(f"{what}: {type(exc).__name__} escaped the pre-flight: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_the_base_model_passes_the_preflight(layout: Layout, case_path: Path) -> None:
    assert check_case(case_path, layout.data, "unmutated") == "pass"


@settings(max_examples=1500, **FUZZ)
@given(data=st.data())
def test_mutated_gguf_ends_in_a_parity_error(layout: Layout, case_path: Path, data: st.DataObject) -> None:
    what, mutate = data.draw(mutations(layout), label="mutation")
    check_case(case_path, bytes(mutate(bytearray(layout.data))), what)


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_declared_lengths_never_allocate(layout: Layout, case_path: Path, data: st.DataObject) -> None:
    """A huge length or count field must be checked against the file size, not allocated."""
    at = data.draw(st.sampled_from(layout.lengths + [a for a, size in layout.counts if size == 8]), label="field")
    value = data.draw(st.sampled_from([2**31, 2**40, 2**62, 2**64 - 1]), label="value")
    mutant = bytearray(layout.data)
    _put(mutant, at, "<Q", value)
    tracemalloc.start()
    try:
        check_case(case_path, bytes(mutant), f"length at {at} = {value}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"length at {at} = {value}: {peak} bytes allocated"


def test_an_exception_that_is_not_paritys_exits_70_with_a_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The funnel's fallback: one line "internal error, please report", the traceback in a log file, never exit 1."""
    import tempfile

    from parity import cli

    def broken(args: object) -> int:
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(cli, "cmd_run", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["run"]) == cli.EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("parity: internal error, please report: ZeroDivisionError: integer division")
    (log,) = tmp_path.glob("parity-internal-error-*.log")
    assert str(log) in err
    assert "Traceback" in log.read_text() and "in broken" in log.read_text()


# --- the checks themselves: each malformed file names the key or tensor and what was expected ---------------


def _tensor_offset_at(lay: Layout, i: int) -> tuple[int, int]:
    at = lay.tensor_offsets[i]
    return at, struct.unpack_from("<Q", lay.data, at)[0]


def _expect_error(lay: Layout, path: Path, mutant: bytearray, *needles: str) -> None:
    line = check_case(path, bytes(mutant), "targeted")
    assert line != "pass"
    for needle in needles:
        assert needle in line, line


def test_overlapping_tensor_offsets_name_the_tensor(layout: Layout, case_path: Path) -> None:
    mutant = bytearray(layout.data)
    at, _ = _tensor_offset_at(layout, 2)
    _put(mutant, at, "<Q", _tensor_offset_at(layout, 1)[1])  # tensor 2 starts where tensor 1 does
    _expect_error(layout, case_path, mutant, "has data offset", "expected", "padded to 32 bytes")


def test_out_of_order_tensor_offsets_are_refused(layout: Layout, case_path: Path) -> None:
    mutant = bytearray(layout.data)
    (a, off_a), (b, off_b) = _tensor_offset_at(layout, 3), _tensor_offset_at(layout, 4)
    _put(mutant, a, "<Q", off_b)
    _put(mutant, b, "<Q", off_a)
    _expect_error(layout, case_path, mutant, "has data offset", "expected")


def test_misaligned_tensor_offset_is_refused(layout: Layout, case_path: Path) -> None:
    mutant = bytearray(layout.data)
    at, off = _tensor_offset_at(layout, 5)
    _put(mutant, at, "<Q", off + 4)
    _expect_error(layout, case_path, mutant, f"data offset {off + 4}, expected {off}")


def test_relabelled_tensor_type_no_longer_fits(layout: Layout, case_path: Path) -> None:
    """F32 -> F16 halves a tensor's size: the next tensor's offset no longer follows (llama.cpp's check)."""
    mutant = bytearray(layout.data)
    _put(mutant, layout.tensor_types[0], "<I", 1)  # F16
    _expect_error(layout, case_path, mutant, "has data offset", "expected")


def test_too_many_dimensions_are_refused(layout: Layout, case_path: Path) -> None:
    mutant = bytearray(layout.data)
    at, _ = layout.counts[2]  # the first tensor's n_dims
    _put(mutant, at, "<I", 5)
    _expect_error(layout, case_path, mutant, "5 dimensions", "at most 4")


def _set_value(lay: Layout, key: str, tag: GGUFValueType, payload: bytes) -> bytearray:
    """The base file with `key`'s type tag and value replaced."""
    raw = key.encode()
    start = lay.data.find(struct.pack("<Q", len(raw)) + raw)
    ((tag_at, _, end),) = [k for k in lay.kv if k[0] == start + 8 + len(raw)]
    infos_end = lay.tensor_offsets[-1] + 8  # the header ends here; then padding, then the tensor data
    head = lay.data[:tag_at] + struct.pack("<I", tag) + payload + lay.data[end:infos_end]
    return bytearray(head + b"\0" * (-len(head) % 32) + lay.data[lay.data_offset :])


def _gguf_str(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


@pytest.mark.parametrize(
    ("key", "tag", "payload", "needles"),
    [
        (
            "llama.block_count",
            GGUFValueType.STRING,
            _gguf_str("abc"),
            ["expected a positive integer", "'abc' (string)"],
        ),
        ("llama.context_length", GGUFValueType.INT32, struct.pack("<i", 256), ["of type uint32", "(int32)"]),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GGUFValueType.ARRAY,
            struct.pack("<IQff", GGUFValueType.FLOAT32, 2, 1.0, 2.0),
            ["expected a finite number", "(array of float32)"],
        ),
        ("llama.rope.freq_base", GGUFValueType.FLOAT32, struct.pack("<f", float("nan")), ["finite number"]),
        ("tokenizer.ggml.bos_token_id", GGUFValueType.STRING, _gguf_str("<s>"), ["bos_token_id", "'<s>' (string)"]),
        ("tokenizer.ggml.bos_token_id", GGUFValueType.FLOAT32, struct.pack("<f", 1.5), ["bos_token_id", "(float32)"]),
        ("tokenizer.ggml.merges", GGUFValueType.UINT32, struct.pack("<I", 7), ["an array of strings", "7 (uint32)"]),
        ("tokenizer.ggml.add_bos_token", GGUFValueType.UINT8, b"\x01", ["expected a bool", "(uint8)"]),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(
    layout: Layout, case_path: Path, key: str, tag: GGUFValueType, payload: bytes, needles: list[str]
) -> None:
    _expect_error(layout, case_path, _set_value(layout, key, tag, payload), f"'{key}'", *needles)


def test_non_numeric_scores_and_scalar_tokens_are_model_format_errors() -> None:
    from parity.errors import ModelFormatError
    from parity.tokenize.gguf_vocab import GGUFVocab

    base = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ModelFormatError, match=r"'tokenizer.ggml.scores': expected an array of finite numbers"):
        GGUFVocab.from_metadata({**base, "tokenizer.ggml.scores": ["x", "y"]}, "m.gguf")
    with pytest.raises(ModelFormatError, match=r"'tokenizer.ggml.tokens': expected an array of strings, got 5"):
        GGUFVocab.from_metadata({**base, "tokenizer.ggml.tokens": 5}, "m.gguf")
    with pytest.raises(ModelFormatError, match=r"'tokenizer.ggml.eos_token_id': expected an integer >= 0"):
        GGUFVocab.from_metadata({**base, "tokenizer.ggml.eos_token_id": "2"}, "m.gguf")
