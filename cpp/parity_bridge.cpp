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
// Nothing here may throw across the C boundary or abort on bad input: arguments are validated first and
// every entry point catches C++ exceptions.

#include "parity_bridge.h"

#include "ggml.h"
#include "llama.h"
#if defined(PARITY_HAS_THREADPOOL) && __has_include("ggml-cpu.h")
#include "ggml-cpu.h"  // mainline moved the CPU threadpool API here
#endif

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

struct parity_model {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    parity_params params{};
    int32_t n_vocab = 0;
#ifdef PARITY_HAS_THREADPOOL
    ggml_threadpool * threadpool = nullptr;
#endif
};

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

// Decodes tokens[0..n) at positions pos0.. as one batch; marks every position (or only the last) for logits.
int decode(parity_model * m, const int32_t * tokens, int32_t n, int32_t pos0, bool all_logits, char * err,
           size_t err_len) {
    llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;  // llama_batch_init leaves it at 0
    for (int32_t i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = pos0 + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = (all_logits || i == n - 1) ? 1 : 0;
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
    if (int rc = check_model(m, true, err, err_len)) {
        return rc;
    }
    const int32_t limit = m->params.n_batch < m->params.n_ctx ? m->params.n_batch : m->params.n_ctx;
    if (int rc = check_tokens(m, tokens, n_tokens, limit, "min(n_batch, n_ctx)", err, err_len)) {
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
    if (int rc = check_model(m, true, err, err_len)) {
        return rc;
    }
    const int32_t limit = m->params.n_batch < m->params.n_ctx ? m->params.n_batch : m->params.n_ctx;
    if (int rc = check_tokens(m, prompt, n_prompt, limit, "min(n_batch, n_ctx)", err, err_len)) {
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
