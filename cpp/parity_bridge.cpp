// parity_bridge.cpp: adapts one llama.h generation to the stable C ABI in parity_bridge.h.
//
// Feature macros come from CMakeLists.txt, which probes the backend's headers at configure time:
//   PARITY_HAS_MODEL_LOAD_FROM_FILE  mainline model/vocab API (llama_model_load_from_file, llama_vocab_*)
//   PARITY_HAS_FLASH_ATTN_TYPE       llama_context_params.flash_attn_type (else bool flash_attn)
//   PARITY_HAS_MEMORY_API            llama_get_memory + llama_memory_clear (else llama_kv_cache_clear)
//   PARITY_HAS_CTX_SEED              llama_context_params.seed (2024 API)
//   PARITY_HAS_TYPE_TRAITS_PTR       ggml_get_type_traits() returning a pointer (else ggml_internal_...)
//   PARITY_HAS_THREADPOOL            ggml_threadpool_new + llama_attach_threadpool (persistent worker threads)
//   PARITY_HAS_CHAT_TEMPLATE         llama_chat_apply_template(tmpl, ...) (mainline); with
//   PARITY_HAS_CHAT_TEMPLATE_MODEL   instead, the 2024 form taking a model first (NULL: use `tmpl`)
//   PARITY_HAS_EXTRA_BUFTS           llama_model_params.use_extra_bufts (weight repacking on/off)
// Nothing here may throw across the C boundary or abort on bad input: arguments are validated first and
// every entry point catches C++ exceptions.

#include "parity_bridge.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#if defined(PARITY_HAS_THREADPOOL) && __has_include("ggml-cpu.h")
#include "ggml-cpu.h"  // mainline moved the CPU threadpool API here
#endif

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

struct parity_model {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    parity_params params{};
    int32_t n_vocab = 0;
#ifdef PARITY_HAS_THREADPOOL
    ggml_threadpool * threadpool = nullptr;
#endif
    parity_capture * capture = nullptr;  // the capture in progress (parity_capture_run), else nullptr
    std::unordered_map<std::string, int32_t> census;  // per-token tensor name -> nodes per graph (capture)
    int32_t census_rows = 0;  // the micro-batch token count it was taken with (0: none yet)
};

// The eval callback installed on every context (defined with the capture code at the end of this file):
// it returns false at once unless a parity_capture_run is in progress, so plain decodes compute the whole
// graph in one piece as without a callback.
static bool capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data);

namespace {

int g_log_level = 1;
int g_last_rank = 1;

int set_err(char * err, size_t err_len, int code, const char * fmt, ...) {
    if (err != nullptr && err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return code;
}

void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    // Map by name, not by number: the enum's values differ between llama.h generations.
    int rank;
    if (level == GGML_LOG_LEVEL_ERROR) {
        rank = 1;
    } else if (level == GGML_LOG_LEVEL_WARN) {
        rank = 2;
    } else if (level == GGML_LOG_LEVEL_INFO) {
        rank = 3;
    } else if (level == GGML_LOG_LEVEL_DEBUG) {
        rank = 4;
    } else {
        rank = g_last_rank;  // a continuation line keeps the level of the line it continues
    }
    g_last_rank = rank;
    if (rank <= g_log_level) {
        std::fputs(text, stderr);
        std::fflush(stderr);
    }
}

bool g_backend_ready = false;

void ensure_backend() {
    if (!g_backend_ready) {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        g_backend_ready = true;
    }
}

#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
const llama_vocab * vocab_of(const parity_model * m) { return llama_model_get_vocab(m->model); }
int32_t n_vocab_of(const llama_model * model) { return llama_vocab_n_tokens(llama_model_get_vocab(model)); }
#else
const llama_model * vocab_of(const parity_model * m) { return m->model; }
int32_t n_vocab_of(const llama_model * model) { return llama_n_vocab(model); }
#endif

void clear_memory(parity_model * m) {
#ifdef PARITY_HAS_MEMORY_API
    llama_memory_clear(llama_get_memory(m->ctx), true);
#else
    llama_kv_cache_clear(m->ctx);
#endif
}

int check_model(parity_model * m, bool need_ctx, char * err, size_t err_len) {
    if (m == nullptr || m->model == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "model handle is NULL or closed");
    }
    if (need_ctx && m->ctx == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "model was opened vocab-only: no context to evaluate with");
    }
    return PARITY_OK;
}

int check_tokens(parity_model * m, const int32_t * tokens, int32_t n_tokens, int32_t limit, const char * limit_name,
                 char * err, size_t err_len) {
    if (tokens == nullptr || n_tokens <= 0) {
        return set_err(err, err_len, PARITY_E_INVALID, "empty token sequence");
    }
    if (n_tokens > limit) {
        return set_err(err, err_len, PARITY_E_INVALID, "%d tokens exceed %s = %d", n_tokens, limit_name, limit);
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->n_vocab) {
            return set_err(err, err_len, PARITY_E_INVALID, "token id %d at position %d is outside [0, %d)",
                           tokens[i], i, m->n_vocab);
        }
    }
    return PARITY_OK;
}

// A context to evaluate with and tokens that fit one decode (min(n_batch, n_ctx)): what every one-batch call checks.
int check_batch(parity_model * m, const int32_t * tokens, int32_t n_tokens, char * err, size_t err_len) {
    if (int rc = check_model(m, true, err, err_len)) {
        return rc;
    }
    const int32_t limit = m->params.n_batch < m->params.n_ctx ? m->params.n_batch : m->params.n_ctx;
    return check_tokens(m, tokens, n_tokens, limit, "min(n_batch, n_ctx)", err, err_len);
}

// Decodes tokens[0..n) at positions pos0.. as one batch; marks every position (or only the last) for logits,
// or, given `outputs` (n flags), exactly the positions flagged (llama.cpp then computes the output head for
// those rows only, as llama-perplexity does for the half of a chunk it scores).
int decode(parity_model * m, const int32_t * tokens, int32_t n, int32_t pos0, bool all_logits, char * err,
           size_t err_len, const std::vector<int8_t> * outputs = nullptr) {
    llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;  // llama_batch_init leaves it at 0
    for (int32_t i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = pos0 + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = outputs != nullptr ? (*outputs)[static_cast<size_t>(i)] : (all_logits || i == n - 1) ? 1 : 0;
    }
    const int32_t rc = llama_decode(m->ctx, batch);
    llama_batch_free(batch);
    if (rc != 0) {
        return set_err(err, err_len, PARITY_E_DECODE, "llama_decode returned %d for %d tokens at position %d", rc, n,
                       pos0);
    }
    return PARITY_OK;
}

int copy_logits(parity_model * m, int32_t ith, float * dst, char * err, size_t err_len) {
    const float * row = llama_get_logits_ith(m->ctx, ith);
    if (row == nullptr) {
        return set_err(err, err_len, PARITY_E_DECODE, "llama_get_logits_ith(%d) returned NULL", ith);
    }
    std::memcpy(dst, row, sizeof(float) * static_cast<size_t>(m->n_vocab));
    return PARITY_OK;
}

int32_t argmax(const float * row, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

}  // namespace

#define PARITY_GUARD_BEGIN try {
#define PARITY_GUARD_END                                                                      \
    }                                                                                         \
    catch (const std::exception & e) {                                                        \
        return set_err(err, err_len, PARITY_E_INVALID, "C++ exception: %s", e.what());        \
    }                                                                                         \
    catch (...) {                                                                             \
        return set_err(err, err_len, PARITY_E_INVALID, "unknown C++ exception");              \
    }

extern "C" {

int parity_api_generation(void) {
#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
    return 2;
#else
    return 1;
#endif
}

const char * parity_system_info(void) { return llama_print_system_info(); }

void parity_set_log_level(int level) {
    g_log_level = level;
    llama_log_set(log_callback, nullptr);
}

int parity_open(const char * path, const parity_params * params, parity_model ** out, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (path == nullptr || params == nullptr || out == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_open: NULL argument");
    }
    *out = nullptr;
    const parity_params & p = *params;
    if (!p.vocab_only) {
        if (p.n_ctx <= 0 || p.n_threads <= 0 || p.n_batch <= 0 || p.n_ubatch <= 0 || p.n_ubatch > p.n_batch) {
            return set_err(err, err_len, PARITY_E_INVALID,
                           "invalid params: n_ctx=%d n_threads=%d n_batch=%d n_ubatch=%d (need all > 0, n_ubatch <= n_batch)",
                           p.n_ctx, p.n_threads, p.n_batch, p.n_ubatch);
        }
        if ((p.type_k != GGML_TYPE_F32 && p.type_k != GGML_TYPE_F16) ||
            (p.type_v != GGML_TYPE_F32 && p.type_v != GGML_TYPE_F16)) {
            return set_err(err, err_len, PARITY_E_INVALID, "KV cache types must be 0 (F32) or 1 (F16), got %d/%d",
                           p.type_k, p.type_v);
        }
        if (p.flash_attn < -1 || p.flash_attn > 1) {
            return set_err(err, err_len, PARITY_E_INVALID, "flash_attn must be -1, 0 or 1, got %d", p.flash_attn);
        }
    }
    FILE * probe = std::fopen(path, "rb");
    if (probe == nullptr) {
        return set_err(err, err_len, PARITY_E_LOAD, "cannot open model file %s", path);
    }
    std::fclose(probe);
    ensure_backend();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = p.vocab_only != 0;
#ifdef PARITY_HAS_EXTRA_BUFTS
    mp.use_extra_bufts = p.repack != 0;
#else
    if (p.repack == 0 && !p.vocab_only) {
        return set_err(err, err_len, PARITY_E_UNSUPPORTED,
                       "this llama.h has no switch for weight repacking (use_extra_bufts); repack must be 1");
    }
#endif
#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
    llama_model * model = llama_model_load_from_file(path, mp);
#else
    llama_model * model = llama_load_model_from_file(path, mp);
#endif
    if (model == nullptr) {
        return set_err(err, err_len, PARITY_E_LOAD, "llama.cpp could not load %s (see the worker log for its reason)",
                       path);
    }
    auto * m = new parity_model();
    m->model = model;
    m->params = p;
    m->n_vocab = n_vocab_of(model);

    if (!p.vocab_only) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = static_cast<uint32_t>(p.n_ctx);
        cp.n_batch = static_cast<uint32_t>(p.n_batch);
        cp.n_ubatch = static_cast<uint32_t>(p.n_ubatch);
        cp.n_threads = p.n_threads;
        cp.n_threads_batch = p.n_threads;
        cp.type_k = static_cast<ggml_type>(p.type_k);
        cp.type_v = static_cast<ggml_type>(p.type_v);
        cp.embeddings = false;
        cp.cb_eval = capture_eval_cb;
        cp.cb_eval_user_data = m;
#ifdef PARITY_HAS_FLASH_ATTN_TYPE
        cp.flash_attn_type = static_cast<llama_flash_attn_type>(p.flash_attn);
#else
        if (p.flash_attn < 0) {
            parity_close(m);
            return set_err(err, err_len, PARITY_E_UNSUPPORTED, "this llama.h has no flash attention 'auto'; use 0 or 1");
        }
        cp.flash_attn = p.flash_attn == 1;
#endif
#ifdef PARITY_HAS_CTX_SEED
        cp.seed = p.seed;
#endif
#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
        m->ctx = llama_init_from_model(model, cp);
#else
        m->ctx = llama_new_context_with_model(model, cp);
#endif
        if (m->ctx == nullptr) {
            parity_close(m);
            return set_err(err, err_len, PARITY_E_LOAD,
                           "llama.cpp could not create a context (n_ctx=%d, KV types %d/%d, flash_attn=%d); see the "
                           "worker log",
                           p.n_ctx, p.type_k, p.type_v, p.flash_attn);
        }
#ifdef PARITY_HAS_THREADPOOL
        // Without an attached pool llama.cpp creates and joins its threads on every decode, which costs
        // far more than a small model's compute. poll = 0: idle threads sleep instead of spinning, so they
        // do not compete with the engine under test for the cores between calls.
        ggml_threadpool_params tpp = ggml_threadpool_params_default(p.n_threads);
        tpp.poll = 0;
        m->threadpool = ggml_threadpool_new(&tpp);
        if (m->threadpool != nullptr) {
            llama_attach_threadpool(m->ctx, m->threadpool, m->threadpool);
        }
#endif
    }
    *out = m;
    return PARITY_OK;
    PARITY_GUARD_END
}

void parity_close(parity_model * m) {
    if (m == nullptr) {
        return;
    }
    if (m->ctx != nullptr) {
        llama_free(m->ctx);
    }
#ifdef PARITY_HAS_THREADPOOL
    if (m->threadpool != nullptr) {
        ggml_threadpool_free(m->threadpool);  // after the context that used it
    }
#endif
    if (m->model != nullptr) {
#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
        llama_model_free(m->model);
#else
        llama_free_model(m->model);
#endif
    }
    delete m;
}

int parity_meta_str(parity_model * m, const char * key, char * buf, size_t buf_len, int32_t * n_out, char * err,
                    size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, false, err, err_len)) {
        return rc;
    }
    if (key == nullptr || n_out == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_meta_str: NULL argument");
    }
    const int32_t n = llama_model_meta_val_str(m->model, key, buf, buf_len);
    *n_out = n;  // -1 when absent; otherwise the full length, possibly more than fits in buf
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_model_info(parity_model * m, parity_info * out, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, false, err, err_len)) {
        return rc;
    }
    if (out == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_model_info: NULL output");
    }
    std::memset(out, 0, sizeof(*out));
    out->n_vocab = m->n_vocab;
#ifdef PARITY_HAS_MODEL_LOAD_FROM_FILE
    const llama_vocab * vocab = llama_model_get_vocab(m->model);
    out->n_ctx_train = llama_model_n_ctx_train(m->model);
    out->n_embd = llama_model_n_embd(m->model);
    out->n_layer = llama_model_n_layer(m->model);
    out->bos = llama_vocab_bos(vocab);
    out->eos = llama_vocab_eos(vocab);
    out->add_bos = llama_vocab_get_add_bos(vocab) ? 1 : 0;
#else
    out->n_ctx_train = llama_n_ctx_train(m->model);
    out->n_embd = llama_n_embd(m->model);
    out->n_layer = llama_n_layer(m->model);
    out->bos = llama_token_bos(m->model);
    out->eos = llama_token_eos(m->model);
    out->add_bos = llama_add_bos_token(m->model) ? 1 : 0;
#endif
    out->n_ctx = m->ctx != nullptr ? static_cast<int32_t>(llama_n_ctx(m->ctx)) : 0;
    if (llama_model_meta_val_str(m->model, "general.architecture", out->architecture, sizeof(out->architecture)) < 0) {
        std::snprintf(out->architecture, sizeof(out->architecture), "unknown");
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_tokenize(parity_model * m, const char * text, int32_t text_len, int32_t add_special, int32_t parse_special,
                    int32_t * out, int32_t cap, int32_t * n_out, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, false, err, err_len)) {
        return rc;
    }
    if (text == nullptr || text_len < 0 || n_out == nullptr || cap < 0 || (out == nullptr && cap > 0)) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_tokenize: bad arguments");
    }
    const int32_t n = llama_tokenize(vocab_of(m), text, text_len, out, cap, add_special != 0, parse_special != 0);
    if (n < 0) {
        if (n == INT32_MIN) {
            return set_err(err, err_len, PARITY_E_TOKENIZE, "tokenization overflowed int32");
        }
        *n_out = -n;
        return set_err(err, err_len, PARITY_E_BUFFER, "token buffer of %d too small, need %d", cap, -n);
    }
    *n_out = n;
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_token_piece(parity_model * m, int32_t token, char * buf, int32_t cap, int32_t * n_out, char * err,
                       size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, false, err, err_len)) {
        return rc;
    }
    if (n_out == nullptr || cap < 0 || (buf == nullptr && cap > 0)) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_token_piece: bad arguments");
    }
    if (token < 0 || token >= m->n_vocab) {
        return set_err(err, err_len, PARITY_E_INVALID, "token id %d is outside [0, %d)", token, m->n_vocab);
    }
    const int32_t n = llama_token_to_piece(vocab_of(m), token, buf, cap, 0, true);
    if (n < 0) {
        *n_out = -n;
        return set_err(err, err_len, PARITY_E_BUFFER, "piece buffer of %d too small, need %d", cap, -n);
    }
    *n_out = n;
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_detokenize(parity_model * m, const int32_t * tokens, int32_t n_tokens, char * buf, int32_t cap,
                      int32_t * n_out, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, false, err, err_len)) {
        return rc;
    }
    if (n_out == nullptr || cap < 0 || (buf == nullptr && cap > 0)) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_detokenize: bad arguments");
    }
    if (n_tokens == 0) {
        *n_out = 0;
        return PARITY_OK;
    }
    if (int rc = check_tokens(m, tokens, n_tokens, INT32_MAX, "INT32_MAX", err, err_len)) {
        return rc;
    }
    const int32_t n = llama_detokenize(vocab_of(m), tokens, n_tokens, buf, cap, false, true);
    if (n < 0) {
        *n_out = -n;
        return set_err(err, err_len, PARITY_E_BUFFER, "text buffer of %d too small, need %d", cap, -n);
    }
    *n_out = n;
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_eval(parity_model * m, const int32_t * tokens, int32_t n_tokens, float * out_logits, char * err,
                size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_batch(m, tokens, n_tokens, err, err_len)) {
        return rc;
    }
    if (out_logits == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_eval: NULL output");
    }
    clear_memory(m);
    if (int rc = decode(m, tokens, n_tokens, 0, true, err, err_len)) {
        return rc;
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        if (int rc = copy_logits(m, i, out_logits + static_cast<size_t>(i) * m->n_vocab, err, err_len)) {
            return rc;
        }
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_eval_rows(parity_model * m, const int32_t * tokens, int32_t n_tokens, const int32_t * rows, int32_t n_rows,
                     float * out_logits, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_batch(m, tokens, n_tokens, err, err_len)) {
        return rc;
    }
    if (out_logits == nullptr || n_rows < 0 || (n_rows > 0 && rows == nullptr)) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_eval_rows: bad rows/output");
    }
    std::vector<int8_t> outputs(static_cast<size_t>(n_tokens), 0);
    for (int32_t k = 0; k < n_rows; k++) {
        if (rows[k] < 0 || rows[k] >= n_tokens || (k > 0 && rows[k] <= rows[k - 1])) {
            return set_err(err, err_len, PARITY_E_INVALID,
                           "parity_eval_rows: rows must increase strictly within [0, %d); row %d is %d", n_tokens, k,
                           rows[k]);
        }
        outputs[static_cast<size_t>(rows[k])] = 1;
    }
    clear_memory(m);
    if (n_rows == 0) {
        return PARITY_OK;
    }
    if (int rc = decode(m, tokens, n_tokens, 0, false, err, err_len, &outputs)) {
        return rc;
    }
    for (int32_t k = 0; k < n_rows; k++) {
        if (int rc = copy_logits(m, rows[k], out_logits + static_cast<size_t>(k) * m->n_vocab, err, err_len)) {
            return rc;
        }
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_eval_stepwise(parity_model * m, const int32_t * tokens, int32_t n_tokens, float * out_logits, char * err,
                         size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_model(m, true, err, err_len)) {
        return rc;
    }
    if (int rc = check_tokens(m, tokens, n_tokens, m->params.n_ctx, "n_ctx", err, err_len)) {
        return rc;
    }
    if (out_logits == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_eval_stepwise: NULL output");
    }
    clear_memory(m);
    for (int32_t i = 0; i < n_tokens; i++) {
        if (int rc = decode(m, tokens + i, 1, i, true, err, err_len)) {
            return rc;
        }
        if (int rc = copy_logits(m, 0, out_logits + static_cast<size_t>(i) * m->n_vocab, err, err_len)) {
            return rc;
        }
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_greedy(parity_model * m, const int32_t * prompt, int32_t n_prompt, int32_t n_new, int32_t * out_tokens,
                  char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_batch(m, prompt, n_prompt, err, err_len)) {
        return rc;
    }
    if (n_new < 0 || (n_new > 0 && out_tokens == nullptr)) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_greedy: bad n_new/output");
    }
    if (n_prompt + n_new > m->params.n_ctx) {
        return set_err(err, err_len, PARITY_E_INVALID, "prompt (%d) + new tokens (%d) exceed n_ctx = %d", n_prompt,
                       n_new, m->params.n_ctx);
    }
    clear_memory(m);
    if (n_new == 0) {
        return PARITY_OK;
    }
    if (int rc = decode(m, prompt, n_prompt, 0, false, err, err_len)) {
        return rc;
    }
    std::vector<float> row(static_cast<size_t>(m->n_vocab));
    for (int32_t step = 0; step < n_new; step++) {
        const int32_t ith = step == 0 ? n_prompt - 1 : 0;
        if (int rc = copy_logits(m, ith, row.data(), err, err_len)) {
            return rc;
        }
        const int32_t next = argmax(row.data(), m->n_vocab);
        out_tokens[step] = next;
        if (step + 1 < n_new) {
            if (int rc = decode(m, &next, 1, n_prompt + step, true, err, err_len)) {
                return rc;
            }
        }
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_chat_apply_template(const char * tmpl, const char * const * roles, const char * const * contents,
                               int32_t n_msg, int32_t add_ass, char * buf, int32_t cap, int32_t * n_out, char * err,
                               size_t err_len) {
    PARITY_GUARD_BEGIN
    if (tmpl == nullptr || n_out == nullptr || n_msg < 0 || cap < 0 || (buf == nullptr && cap > 0) ||
        (n_msg > 0 && (roles == nullptr || contents == nullptr))) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_chat_apply_template: bad arguments");
    }
    std::vector<llama_chat_message> chat(static_cast<size_t>(n_msg));
    for (int32_t i = 0; i < n_msg; i++) {
        if (roles[i] == nullptr || contents[i] == nullptr) {
            return set_err(err, err_len, PARITY_E_INVALID, "message %d has a NULL role or content", i);
        }
        chat[static_cast<size_t>(i)] = llama_chat_message{roles[i], contents[i]};
    }
#if defined(PARITY_HAS_CHAT_TEMPLATE)
    *n_out = llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_ass != 0, buf, cap);
#elif defined(PARITY_HAS_CHAT_TEMPLATE_MODEL)
    *n_out = llama_chat_apply_template(nullptr, tmpl, chat.data(), chat.size(), add_ass != 0, buf, cap);
#else
    (void) add_ass;
    return set_err(err, err_len, PARITY_E_UNSUPPORTED, "this llama.h has no llama_chat_apply_template");
#endif
    if (*n_out < 0) {
        *n_out = -1;  // llama.cpp does not recognise the template
    }
    return PARITY_OK;
    PARITY_GUARD_END
}

int parity_dequantize(int32_t type, const void * src, size_t src_len, int64_t n_elements, float * dst,
                      char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (src == nullptr || dst == nullptr || n_elements <= 0 || type < 0 || type >= GGML_TYPE_COUNT) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_dequantize: bad arguments (type %d, n %lld)", type,
                       static_cast<long long>(n_elements));
    }
    const ggml_type t = static_cast<ggml_type>(type);
#ifdef PARITY_HAS_TYPE_TRAITS_PTR
    const auto * traits = ggml_get_type_traits(t);
    auto to_float = traits != nullptr ? traits->to_float : nullptr;
#else
    auto to_float = ggml_internal_get_type_traits(t).to_float;
#endif
    const int64_t block = ggml_blck_size(t);
    const size_t type_size = ggml_type_size(t);
    // Removed type ids keep a table entry with block size 0: refuse them before dividing by it.
    if (to_float == nullptr || block <= 0 || type_size == 0) {
        return set_err(err, err_len, PARITY_E_UNSUPPORTED, "ggml has no dequantizer for type %s (%d)",
                       ggml_type_name(t), type);
    }
    if (n_elements % block != 0) {
        return set_err(err, err_len, PARITY_E_INVALID, "%lld elements is not a multiple of the %s block size %lld",
                       static_cast<long long>(n_elements), ggml_type_name(t), static_cast<long long>(block));
    }
    // ggml_row_size(t, n_elements), computed here so that an absurd n cannot overflow it.
    const uint64_t n_blocks = static_cast<uint64_t>(n_elements / block);
    if (n_blocks > SIZE_MAX / type_size) {
        return set_err(err, err_len, PARITY_E_INVALID, "%lld %s elements do not fit in memory",
                       static_cast<long long>(n_elements), ggml_type_name(t));
    }
    const size_t expected = static_cast<size_t>(n_blocks) * type_size;
    if (src_len != expected) {
        return set_err(err, err_len, PARITY_E_INVALID,
                       "%lld elements of type %s take %llu bytes (%llu blocks of %llu), but the buffer holds %llu",
                       static_cast<long long>(n_elements), ggml_type_name(t),
                       static_cast<unsigned long long>(expected), static_cast<unsigned long long>(n_blocks),
                       static_cast<unsigned long long>(type_size), static_cast<unsigned long long>(src_len));
    }
    to_float(src, dst, n_elements);
    return PARITY_OK;
    PARITY_GUARD_END
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// Graph tensor capture (parity_capture_run; contract in parity_bridge.h).
//
// llama.cpp's scheduler asks the eval callback about every graph node in order (ask = true) before computing
// it; a node the callback wants ends a piece of the graph: the piece is computed, then the callback is called
// again (ask = false) with the node's data in place, before any later node runs. Recording reads it there;
// teacher forcing overwrites it there, so every op downstream reads the given values.
// One graph is computed per micro-batch; its last named node is result_output (every llama.cpp
// architecture names its logits so), so the first node asked after it starts the next micro-batch.

struct parity_capture {
    struct entry {
        std::string name;
        bool record = false;
        const float * replace = nullptr;
        int64_t replace_width = 0;
        int64_t width = -1;       // floats per token row, once seen
        std::vector<float> data;  // n_tokens * width floats when recorded (and within the budget)
        int32_t occurrences = 0;  // nodes carrying the name in the first micro-batch
        int32_t filled = 0;       // micro-batches whose rows were written
        bool replaced_ub = false; // replaced in the current micro-batch
        int32_t n_replaced = 0;   // micro-batches in which it was replaced
    };
    std::vector<entry> entries;
    std::unordered_map<std::string, size_t> index;
    std::vector<std::string> listed;                  // per-token names, in the order first computed
    std::unordered_map<std::string, int32_t> counts;  // name -> nodes in the current micro-batch
    std::unordered_map<std::string, int32_t> census;  // name -> nodes in the first micro-batch
    std::string names_text;
    std::vector<uint8_t> scratch;
    // decode state
    const std::unordered_map<std::string, int32_t> * last_of = nullptr;  // the census replacements rely on
    int32_t n_tokens = 0;
    int32_t n_ubatch = 0;
    int32_t ubatch = 0;
    int32_t row0 = 0;
    int32_t ub_rows = 0;
    bool end_seen = false;
    uint64_t budget = 0;
    uint64_t needed = 0;
    bool over = false;
    int error_code = PARITY_OK;
    std::string error;
};

namespace {

bool derived_name(const char * name) {
    // ggml names views and copies after their source: "Kcur-0 (view)", "x (reshaped)", "x (copy of y)";
    // a node nobody named gets "node_<index>" when the graph is built: neither is a graph name to compare.
    if (std::strstr(name, " (") != nullptr) {
        return true;
    }
    if (std::strncmp(name, "node_", 5) != 0 || name[5] == '\0') {
        return false;
    }
    for (const char * p = name + 5; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return false;
        }
    }
    return true;
}

// Rows of `t` when it is a per-token tensor of a micro-batch of `rows` tokens, else 0.
int64_t token_width(const ggml_tensor * t, int32_t rows) {
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16) {
        return 0;
    }
    const int64_t n = ggml_nelements(t);
    if (n <= 0 || rows <= 0) {
        return 0;
    }
    if (rows == 1) {
        return n;
    }
    int outer = 0;
    for (int d = GGML_MAX_DIMS - 1; d >= 0; d--) {
        if (t->ne[d] != 1) {
            outer = d;
            break;
        }
    }
    return t->ne[outer] == rows ? n / rows : 0;
}

void capture_fail(parity_capture * c, int code, const std::string & message) {
    if (c->error_code == PARITY_OK) {
        c->error_code = code;
        c->error = message;
    }
}

float load_value(const uint8_t * p, ggml_type type) {
    if (type == GGML_TYPE_F32) {
        float v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    if (type == GGML_TYPE_F16) {
        ggml_fp16_t f;
        std::memcpy(&f, &h, sizeof f);
        return ggml_fp16_to_fp32(f);
    }
    const uint32_t bits = static_cast<uint32_t>(h) << 16;  // BF16: the high half of an IEEE float
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// Copies every element of `t` in ggml order (i0 fastest) to dst, reading through the strides.
bool read_tensor(parity_capture * c, const ggml_tensor * t, float * dst) {
    const size_t nbytes = ggml_nbytes(t);
    const uint8_t * base = nullptr;
    if (t->data == nullptr) {
        capture_fail(c, PARITY_E_UNSUPPORTED, std::string("tensor '") + t->name + "' has no data to read");
        return false;
    }
    if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
        base = static_cast<const uint8_t *>(t->data);
    } else {
        c->scratch.resize(nbytes);
        ggml_backend_tensor_get(t, c->scratch.data(), 0, nbytes);
        base = c->scratch.data();
    }
    if (t->type == GGML_TYPE_F32 && ggml_is_contiguous(t)) {
        std::memcpy(dst, base, sizeof(float) * static_cast<size_t>(ggml_nelements(t)));
        return true;
    }
    size_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++) {
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++) {
                const uint8_t * row = base + i3 * t->nb[3] + i2 * t->nb[2] + i1 * t->nb[1];
                for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
                    dst[k++] = load_value(row + i0 * t->nb[0], t->type);
                }
            }
        }
    }
    return true;
}

void next_ubatch(parity_capture * c) {
    c->ubatch++;
    c->row0 += c->ub_rows;
    const int32_t left = c->n_tokens - c->row0;
    c->ub_rows = left < c->n_ubatch ? left : c->n_ubatch;
    c->counts.clear();
    for (auto & e : c->entries) {
        e.replaced_ub = false;
    }
    c->end_seen = false;
}

bool capture_ask(parity_capture * c, ggml_tensor * t) {
    if (c->end_seen) {
        next_ubatch(c);
    }
    if (std::strcmp(t->name, "result_output") == 0) {
        c->end_seen = true;
    }
    if (t->name[0] == '\0' || derived_name(t->name) || c->ub_rows <= 0 || token_width(t, c->ub_rows) == 0) {
        return false;
    }
    const std::string name(t->name);
    const int32_t n = ++c->counts[name];
    if (c->ubatch == 0) {
        if (n == 1) {
            c->listed.push_back(name);
        }
        c->census[name] = n;
    }
    const auto it = c->index.find(name);
    return it != c->index.end() && c->error_code == PARITY_OK;
}

void capture_computed(parity_capture * c, ggml_tensor * t) {
    auto & e = c->entries[c->index.at(t->name)];
    const int64_t width = token_width(t, c->ub_rows);
    const int32_t nth = c->counts[e.name];
    if (c->ubatch == 0) {
        e.occurrences = nth;
    }
    if (e.record) {
        if (c->ubatch == 0 && e.width != width) {  // first node, or a later node of another width: it wins
            const uint64_t bytes = sizeof(float) * static_cast<uint64_t>(c->n_tokens) * static_cast<uint64_t>(width);
            const uint64_t before = e.width < 0 ? 0 : sizeof(float) * static_cast<uint64_t>(c->n_tokens) * e.width;
            c->needed = c->needed - before + bytes;
            e.width = width;
            e.data.clear();
            if (c->needed > c->budget && !c->over) {
                c->over = true;
                for (auto & other : c->entries) {
                    std::vector<float>().swap(other.data);
                }
            }
            if (!c->over) {
                e.data.resize(static_cast<size_t>(bytes / sizeof(float)));
            }
        } else if (e.width != width) {
            capture_fail(c, PARITY_E_UNSUPPORTED,
                         "tensor '" + e.name + "' is " + std::to_string(width) + " floats per token in micro-batch " +
                             std::to_string(c->ubatch) + " but " + std::to_string(e.width) + " in the first");
            return;
        }
        if (!c->over && !read_tensor(c, t, e.data.data() + static_cast<size_t>(c->row0) * width)) {
            return;
        }
        if (nth == 1) {
            e.filled++;
        }
    }
    if (e.replace != nullptr) {
        const auto last = c->last_of->find(e.name);
        if (last == c->last_of->end() || nth != last->second) {
            return;  // an earlier node carrying the same name: the last one is replaced
        }
        if (e.replace_width != width) {
            capture_fail(c, PARITY_E_INVALID,
                         "replacement for '" + e.name + "' has " + std::to_string(e.replace_width) +
                             " floats per token, the graph's tensor " + std::to_string(width));
            return;
        }
        if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || t->data == nullptr ||
            (t->buffer != nullptr && !ggml_backend_buffer_is_host(t->buffer))) {
            capture_fail(c, PARITY_E_UNSUPPORTED,
                         "cannot overwrite '" + e.name + "' (type " + ggml_type_name(t->type) +
                             (ggml_is_contiguous(t) ? "" : ", not contiguous") +
                             "): teacher forcing needs an F32, contiguous tensor in host (CPU) memory");
            return;
        }
        std::memcpy(t->data, e.replace + static_cast<size_t>(c->row0) * width,
                    sizeof(float) * static_cast<size_t>(ggml_nelements(t)));
        if (!e.replaced_ub) {
            e.replaced_ub = true;
            e.n_replaced++;
        }
    }
}

}  // namespace

static bool capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * m = static_cast<parity_model *>(user_data);
    parity_capture * c = m != nullptr ? m->capture : nullptr;
    if (c == nullptr) {
        return false;  // no capture in progress: compute the graph in one piece (ask) / go on (after a node)
    }
    // Exceptions must not unwind through ggml's C frames: the first one is kept and reported after the decode.
    try {
        if (ask) {
            return capture_ask(c, t);
        }
        if (c->error_code == PARITY_OK) {
            capture_computed(c, t);
        }
    } catch (const std::exception & e) {
        capture_fail(c, PARITY_E_INVALID, std::string("C++ exception in the eval callback: ") + e.what());
    } catch (...) {
        capture_fail(c, PARITY_E_INVALID, "unknown C++ exception in the eval callback");
    }
    return true;
}

namespace {

// One decode of `tokens` with `c` active; the context's memory is cleared first.
int capture_decode(parity_model * m, parity_capture * c, const int32_t * tokens, int32_t n_tokens, char * err,
                   size_t err_len) {
    c->n_tokens = n_tokens;
    c->n_ubatch = static_cast<int32_t>(llama_n_ubatch(m->ctx));
    if (c->n_ubatch <= 0) {
        c->n_ubatch = n_tokens;
    }
    c->ubatch = 0;
    c->row0 = 0;
    c->ub_rows = n_tokens < c->n_ubatch ? n_tokens : c->n_ubatch;
    c->end_seen = false;
    c->counts.clear();
    c->census.clear();
    c->listed.clear();
    clear_memory(m);
    m->capture = c;
    const int rc = decode(m, tokens, n_tokens, 0, true, err, err_len);
    m->capture = nullptr;
    if (rc != PARITY_OK) {
        return rc;
    }
    if (c->error_code != PARITY_OK) {
        return set_err(err, err_len, c->error_code, "%s", c->error.c_str());
    }
    const int32_t expected = (n_tokens + c->n_ubatch - 1) / c->n_ubatch;
    if (c->ubatch + 1 != expected) {
        return set_err(err, err_len, PARITY_E_UNSUPPORTED,
                       "saw %d micro-batch graphs for %d tokens in micro-batches of %d (expected %d): cannot "
                       "align tensor rows; use n_ubatch >= %d",
                       c->ubatch + 1, n_tokens, c->n_ubatch, expected, n_tokens);
    }
    return PARITY_OK;
}

}  // namespace

extern "C" {

int parity_capture_run(parity_model * m, const int32_t * tokens, int32_t n_tokens, const char * const * names,
                       int32_t n_names, const char * const * replace_names, const float * const * replace_data,
                       const int64_t * replace_width, int32_t n_replace, uint64_t max_bytes, float * out_logits,
                       parity_capture ** out, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (int rc = check_batch(m, tokens, n_tokens, err, err_len)) {
        return rc;
    }
    if (out == nullptr || n_names < 0 || n_replace < 0 || (n_names > 0 && names == nullptr) ||
        (n_replace > 0 && (replace_names == nullptr || replace_data == nullptr || replace_width == nullptr))) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_capture_run: bad arguments");
    }
    *out = nullptr;
    std::unique_ptr<parity_capture> c(new parity_capture());
    c->budget = max_bytes;
    auto add = [&](const char * name) -> parity_capture::entry * {
        if (name == nullptr || name[0] == '\0') {
            return nullptr;
        }
        auto it = c->index.find(name);
        if (it == c->index.end()) {
            it = c->index.emplace(name, c->entries.size()).first;
            c->entries.emplace_back();
            c->entries.back().name = name;
        }
        return &c->entries[it->second];
    };
    for (int32_t i = 0; i < n_names; i++) {
        auto * e = add(names[i]);
        if (e == nullptr) {
            return set_err(err, err_len, PARITY_E_INVALID, "tensor name %d is NULL or empty", i);
        }
        e->record = true;
    }
    for (int32_t i = 0; i < n_replace; i++) {
        auto * e = add(replace_names[i]);
        if (e == nullptr || replace_data[i] == nullptr || replace_width[i] <= 0) {
            return set_err(err, err_len, PARITY_E_INVALID, "replacement %d has no name, data or width", i);
        }
        e->replace = replace_data[i];
        e->replace_width = replace_width[i];
    }
    // Which node of a name is its last needs the graph's census: one decode that records nothing, unless a
    // capture with the same first micro-batch size took it (with one token per micro-batch every node counts
    // as per-token, so the census depends on that size).
    const int32_t n_ub_ctx = static_cast<int32_t>(llama_n_ubatch(m->ctx));
    const int32_t first_rows = n_ub_ctx > 0 && n_ub_ctx < n_tokens ? n_ub_ctx : n_tokens;
    if (n_replace > 0 && m->census_rows != first_rows) {
        parity_capture probe;
        if (int rc = capture_decode(m, &probe, tokens, n_tokens, err, err_len)) {
            return rc;
        }
        m->census = probe.census;
        m->census_rows = first_rows;
    }
    c->last_of = &m->census;
    if (int rc = capture_decode(m, c.get(), tokens, n_tokens, err, err_len)) {
        return rc;
    }
    if (m->census_rows != first_rows) {
        m->census = c->census;
        m->census_rows = first_rows;
    }
    for (const auto & e : c->entries) {
        if (c->census.find(e.name) == c->census.end()) {
            return set_err(err, err_len, PARITY_E_INVALID,
                           "the graph computed no per-token tensor named '%s' (parity_capture_names lists those it did)",
                           e.name.c_str());
        }
    }
    if (c->over) {
        return set_err(err, err_len, PARITY_E_BUFFER,
                       "capturing %zu tensors of %d tokens needs %llu bytes, over the budget of %llu bytes: ask for "
                       "fewer names or tokens, or raise the budget",
                       c->entries.size(), n_tokens, static_cast<unsigned long long>(c->needed),
                       static_cast<unsigned long long>(c->budget));
    }
    const int32_t n_ub = c->ubatch + 1;
    for (const auto & e : c->entries) {
        if ((e.record && e.filled != n_ub) || (e.replace != nullptr && e.n_replaced != n_ub)) {
            return set_err(err, err_len, PARITY_E_UNSUPPORTED,
                           "tensor '%s' was %s in %d of %d micro-batches: cannot align its rows", e.name.c_str(),
                           e.record ? "recorded" : "replaced", e.record ? e.filled : e.n_replaced, n_ub);
        }
    }
    for (int32_t i = 0; out_logits != nullptr && i < n_tokens; i++) {
        if (int rc = copy_logits(m, i, out_logits + static_cast<size_t>(i) * m->n_vocab, err, err_len)) {
            return rc;
        }
    }
    for (const auto & name : c->listed) {
        c->names_text += name;
        c->names_text += '\n';
    }
    *out = c.release();
    return PARITY_OK;
    PARITY_GUARD_END
}

const char * parity_capture_names(const parity_capture * c) { return c != nullptr ? c->names_text.c_str() : ""; }

int32_t parity_capture_count(const parity_capture * c) {
    if (c == nullptr) {
        return 0;
    }
    int32_t n = 0;
    for (const auto & e : c->entries) {
        n += e.record ? 1 : 0;
    }
    return n;
}

int parity_capture_tensor(const parity_capture * c, int32_t i, const char ** name, int32_t * n_rows, int64_t * width,
                          int32_t * occurrences, const float ** data, char * err, size_t err_len) {
    PARITY_GUARD_BEGIN
    if (c == nullptr || name == nullptr || n_rows == nullptr || width == nullptr || occurrences == nullptr ||
        data == nullptr) {
        return set_err(err, err_len, PARITY_E_INVALID, "parity_capture_tensor: NULL argument");
    }
    int32_t k = 0;
    for (const auto & e : c->entries) {
        if (!e.record) {
            continue;
        }
        if (k++ == i) {
            *name = e.name.c_str();
            *n_rows = c->n_tokens;
            *width = e.width;
            *occurrences = e.occurrences;
            *data = e.data.data();
            return PARITY_OK;
        }
    }
    return set_err(err, err_len, PARITY_E_INVALID, "capture index %d outside [0, %d)", i, k);
    PARITY_GUARD_END
}

void parity_capture_free(parity_capture * c) { delete c; }

}  // extern "C"
