"""cffi (ABI mode) binding of cpp/parity_bridge.h. Used only inside a worker process (parity.backends.worker).

The cdef is read from the header itself (the CDEF-BEGIN/END block), so the C ABI is written down once.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.core import paths

ERR_LEN = 4096
_CODES = {
    1: "invalid argument",
    2: "load failure",
    3: "decode failure",
    4: "buffer too small",
    5: "tokenize failure",
    6: "unsupported",
}


class BridgeError(Exception):
    """A bridge call returned a non-zero status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{_CODES.get(code, f'error {code}')}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BackendParams:
    """Context parameters passed to llama.cpp. Defaults are the most precise configuration."""

    n_ctx: int = 256
    n_threads: int = 2
    n_batch: int = 256
    n_ubatch: int = 256
    type_k: int = 0  # ggml_type: 0 = F32, 1 = F16
    type_v: int = 0
    flash_attn: int = 0  # 0 off, 1 on, -1 auto
    seed: int = 0
    vocab_only: int = 0
    repack: int = 1  # weight repacking (use_extra_bufts): llama.cpp's default on; 0 where the llama.h allows it

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


CAPTURE_BUDGET = 2 << 30  # bytes of recorded tensors one capture may hold (parity_capture_run's max_bytes)


@dataclass(frozen=True)
class Capture:
    """What one parity_capture_run returns: the decode's logits, the recorded tensors (name -> float32
    (n_tokens, width)), every per-token tensor name the graph computed (in order), and how many graph nodes
    carried each recorded name (more than 1: the last one computed was recorded)."""

    logits: np.ndarray
    tensors: dict[str, np.ndarray]
    names: list[str]
    occurrences: dict[str, int]


def cdef_source(header: Path | None = None) -> str:
    """The declarations between CDEF-BEGIN and CDEF-END in parity_bridge.h."""
    header = header or paths.project_root() / "cpp" / "parity_bridge.h"
    text = header.read_text(encoding="utf-8")
    start = text.index("/* CDEF-BEGIN */") + len("/* CDEF-BEGIN */")
    return text[start : text.index("/* CDEF-END */")]


class Bridge:
    """The loaded bridge library."""

    def __init__(self, lib_path: Path) -> None:
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(cdef_source())
        self.lib: Any = self.ffi.dlopen(str(lib_path))
        self.path = lib_path

    def _err(self) -> Any:
        return self.ffi.new("char[]", ERR_LEN)

    def check(self, rc: int, err: Any) -> None:
        if rc != 0:
            raise BridgeError(rc, self.ffi.string(err).decode("utf-8", "replace"))

    def api_generation(self) -> int:
        return int(self.lib.parity_api_generation())

    def system_info(self) -> str:
        return str(self.ffi.string(self.lib.parity_system_info()).decode("utf-8", "replace"))

    def set_log_level(self, level: int) -> None:
        self.lib.parity_set_log_level(level)

    def open(self, model_path: str, params: BackendParams) -> BridgeModel:
        p = self.ffi.new("parity_params *", params.to_dict())
        out = self.ffi.new("parity_model **")
        err = self._err()
        self.check(self.lib.parity_open(model_path.encode(), p, out, err, ERR_LEN), err)
        return BridgeModel(self, out[0], params)

    def chat_apply_template(self, tmpl: str, messages: list[dict[str, str]], add_ass: bool = True) -> str | None:
        """llama.cpp's built-in chat formatter (llama_chat_apply_template); None when it does not know `tmpl`."""
        ffi = self.ffi
        keep = [ffi.new("char[]", m[k].encode("utf-8")) for m in messages for k in ("role", "content")]
        roles = ffi.new("const char *[]", keep[0::2] or [ffi.NULL])
        contents = ffi.new("const char *[]", keep[1::2] or [ffi.NULL])
        n = ffi.new("int32_t *")
        cap = 2 * sum(len(m["content"]) + len(m["role"]) for m in messages) + 256
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            err = self._err()
            rc = self.lib.parity_chat_apply_template(
                tmpl.encode("utf-8"), roles, contents, len(messages), int(add_ass), buf, cap, n, err, ERR_LEN
            )
            self.check(rc, err)
            if n[0] < 0:
                return None
            if n[0] <= cap:
                return bytes(ffi.buffer(buf, n[0])).decode("utf-8", "replace")
            cap = n[0] + 1
        raise BridgeError(4, "chat template buffer negotiation failed")

    def dequantize(self, ggml_type: int, raw: bytes, n_elements: int) -> np.ndarray:
        """ggml's own `to_float` of `n_elements` values of `ggml_type` stored in `raw` (its exact byte length)."""
        if n_elements <= 0:
            raise BridgeError(1, f"parity_dequantize: n_elements must be positive, got {n_elements}")
        dst = np.empty(n_elements, dtype=np.float32)
        err = self._err()
        src = self.ffi.from_buffer(raw)
        out = self.ffi.from_buffer("float[]", dst)
        # len(src): the byte length of the buffer actually passed, so C can refuse a short one
        rc = self.lib.parity_dequantize(ggml_type, src, len(src), n_elements, out, err, ERR_LEN)
        self.check(rc, err)
        return dst


class BridgeModel:
    """An open model (and context unless vocab-only)."""

    def __init__(self, bridge: Bridge, handle: Any, params: BackendParams) -> None:
        self.b = bridge
        self.h = handle
        self.params = params
        info = self.info()
        self.n_vocab = int(info["n_vocab"])
        self._spare: np.ndarray | None = None  # eval_rows' output, reused (see _spare_rows)

    def close(self) -> None:
        if self.h is not None:
            self.b.lib.parity_close(self.h)
            self.h = None

    def info(self) -> dict[str, Any]:
        ffi = self.b.ffi
        out = ffi.new("parity_info *")
        err = self.b._err()
        self.b.check(self.b.lib.parity_model_info(self.h, out, err, ERR_LEN), err)
        keys = ("n_vocab", "n_ctx_train", "n_ctx", "n_embd", "n_layer", "bos", "eos", "add_bos")
        d: dict[str, Any] = {k: int(getattr(out, k)) for k in keys}
        d["architecture"] = ffi.string(out.architecture).decode("utf-8", "replace")
        d["api_generation"] = self.b.api_generation()
        return d

    def meta(self, key: str) -> str | None:
        ffi = self.b.ffi
        n = ffi.new("int32_t *")
        err = self.b._err()
        self.b.check(self.b.lib.parity_meta_str(self.h, key.encode(), ffi.NULL, 0, n, err, ERR_LEN), err)
        if n[0] < 0:
            return None
        buf = ffi.new("char[]", n[0] + 1)
        self.b.check(self.b.lib.parity_meta_str(self.h, key.encode(), buf, n[0] + 1, n, err, ERR_LEN), err)
        return str(ffi.string(buf).decode("utf-8", "replace"))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        ffi = self.b.ffi
        data = text.encode("utf-8")
        cap = len(data) + 16
        for _ in range(2):
            out = ffi.new("int32_t[]", cap)
            n = ffi.new("int32_t *")
            err = self.b._err()
            rc = self.b.lib.parity_tokenize(
                self.h, data, len(data), int(add_special), int(parse_special), out, cap, n, err, ERR_LEN
            )
            if rc == 4:  # buffer too small: retry with the size it asked for
                cap = n[0]
                continue
            self.b.check(rc, err)
            return [int(out[i]) for i in range(n[0])]
        raise BridgeError(4, "tokenize buffer negotiation failed")

    def piece(self, token: int) -> bytes:
        ffi = self.b.ffi
        cap = 64
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            n = ffi.new("int32_t *")
            err = self.b._err()
            rc = self.b.lib.parity_token_piece(self.h, token, buf, cap, n, err, ERR_LEN)
            if rc == 4:
                cap = n[0]
                continue
            self.b.check(rc, err)
            return bytes(ffi.buffer(buf, n[0]))
        raise BridgeError(4, "piece buffer negotiation failed")

    def detokenize(self, tokens: list[int]) -> str:
        ffi = self.b.ffi
        arr = ffi.new("int32_t[]", tokens)
        cap = 16 * len(tokens) + 16
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            n = ffi.new("int32_t *")
            err = self.b._err()
            rc = self.b.lib.parity_detokenize(self.h, arr, len(tokens), buf, cap, n, err, ERR_LEN)
            if rc == 4:
                cap = n[0]
                continue
            self.b.check(rc, err)
            return bytes(ffi.buffer(buf, n[0])).decode("utf-8", "replace")
        raise BridgeError(4, "detokenize buffer negotiation failed")

    def _eval(self, fn: Any, tokens: list[int]) -> np.ndarray:
        ffi = self.b.ffi
        arr = ffi.new("int32_t[]", tokens)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        err = self.b._err()
        self.b.check(fn(self.h, arr, len(tokens), ffi.from_buffer("float[]", out), err, ERR_LEN), err)
        return out

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Logits (n_tokens, n_vocab) from one llama_decode of the whole sequence."""
        return self._eval(self.b.lib.parity_eval, tokens)

    def eval_rows(self, tokens: list[int], rows: list[int]) -> np.ndarray:
        """Logits (len(rows), n_vocab) of the positions `rows` (strictly increasing) from one llama_decode of the
        whole sequence that computes the output head for those positions only (parity_eval_rows)."""
        ffi = self.b.ffi
        arr = ffi.new("int32_t[]", tokens)
        c_rows = ffi.new("int32_t[]", rows or [0])
        out = self._spare_rows(len(rows))
        err = self.b._err()
        buf = ffi.from_buffer("float[]", out) if rows else ffi.new("float[]", 1)
        self.b.check(self.b.lib.parity_eval_rows(self.h, arr, len(tokens), c_rows, len(rows), buf, err, ERR_LEN), err)
        return out

    def _spare_rows(self, n: int) -> np.ndarray:
        """An (n, n_vocab) float32 output array: the previous one when nothing references it any more (the worker
        has sent it), else a new one kept for next time. Faulting in a fresh 128 MB array costs ~130 ms."""
        spare = self._spare
        # references: the attribute, the local name, getrefcount's argument
        if spare is not None and spare.shape[0] == n and sys.getrefcount(spare) == 3:
            return spare
        self._spare = out = np.empty((n, self.n_vocab), dtype=np.float32)
        return out

    def eval_stepwise(self, tokens: list[int]) -> np.ndarray:
        """Logits (n_tokens, n_vocab) decoding one token at a time."""
        return self._eval(self.b.lib.parity_eval_stepwise, tokens)

    def capture(
        self,
        tokens: list[int],
        names: list[str],
        replace: dict[str, np.ndarray] | None = None,
        max_bytes: int = CAPTURE_BUDGET,
        with_logits: bool = True,
    ) -> Capture:
        """One llama_decode of `tokens` capturing the graph tensors named exactly in `names` (parity_capture_run).

        `replace` (name -> float32 (n_tokens, width)) overwrites each named tensor once computed (teacher
        forcing). Over `max_bytes` of recorded floats, a BridgeError (buffer too small) gives the size needed.
        Without `with_logits` the Capture's logits are an empty (0, n_vocab) array (nothing copied).
        """
        ffi = self.b.ffi
        arr = ffi.new("int32_t[]", tokens)
        logits = np.empty((len(tokens) if with_logits else 0, self.n_vocab), dtype=np.float32)
        keep = [ffi.new("char[]", n.encode("utf-8")) for n in names]
        c_names = ffi.new("const char *[]", keep or [ffi.NULL])
        rep = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (replace or {}).items()}
        for key, value in rep.items():
            if value.ndim != 2 or value.shape[0] != len(tokens):
                raise BridgeError(1, f"replacement for '{key}' must be ({len(tokens)}, width), got {value.shape}")
        keep_r = [ffi.new("char[]", k.encode("utf-8")) for k in rep]
        r_names = ffi.new("const char *[]", keep_r or [ffi.NULL])
        r_data = ffi.new("const float *[]", [ffi.from_buffer("float[]", v) for v in rep.values()] or [ffi.NULL])
        r_width = ffi.new("int64_t[]", [v.shape[1] for v in rep.values()] or [0])
        out = ffi.new("parity_capture **")
        err = self.b._err()
        rc = self.b.lib.parity_capture_run(
            self.h, arr, len(tokens), c_names, len(names), r_names, r_data, r_width, len(rep), max_bytes,
            ffi.from_buffer("float[]", logits) if with_logits else ffi.NULL, out, err, ERR_LEN,
        )  # fmt: skip
        self.b.check(rc, err)
        cap = out[0]
        try:
            listed = ffi.string(self.b.lib.parity_capture_names(cap)).decode("utf-8", "replace").split("\n")
            tensors: dict[str, np.ndarray] = {}
            occurrences: dict[str, int] = {}
            p_name = ffi.new("const char **")
            p_rows = ffi.new("int32_t *")
            p_width = ffi.new("int64_t *")
            p_occ = ffi.new("int32_t *")
            p_data = ffi.new("const float **")
            for i in range(self.b.lib.parity_capture_count(cap)):
                rc = self.b.lib.parity_capture_tensor(cap, i, p_name, p_rows, p_width, p_occ, p_data, err, ERR_LEN)
                self.b.check(rc, err)
                name = ffi.string(p_name[0]).decode("utf-8", "replace")
                rows, width = int(p_rows[0]), int(p_width[0])
                buf = ffi.buffer(p_data[0], 4 * rows * width)
                tensors[name] = np.frombuffer(buf, dtype=np.float32).reshape(rows, width).copy()
                occurrences[name] = int(p_occ[0])
        finally:
            self.b.lib.parity_capture_free(cap)
        return Capture(logits, tensors, [n for n in listed if n], occurrences)

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        ffi = self.b.ffi
        arr = ffi.new("int32_t[]", tokens)
        out = ffi.new("int32_t[]", max(n_new, 1))
        err = self.b._err()
        self.b.check(self.b.lib.parity_greedy(self.h, arr, len(tokens), n_new, out, err, ERR_LEN), err)
        return [int(out[i]) for i in range(n_new)]
