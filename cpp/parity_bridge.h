/*
 * parity_bridge.h: the stable C ABI between parity (Python, cffi ABI mode) and one llama.h generation.
 *
 * The same parity_bridge.cpp compiles against mainline llama.cpp and against bitnet.cpp's 2024 fork; the
 * differences are detected at configure time (CMakeLists.txt) and handled inside the .cpp, so Python
 * never mirrors a llama.h struct. Every function returns a status code (PARITY_OK on success) and, on
 * failure, writes a NUL-terminated message into the caller's `err` buffer. Bad input never aborts.
 *
 * The block between CDEF-BEGIN and CDEF-END is read verbatim by parity/bridge.py as the cffi cdef: keep it
 * free of preprocessor directives and C++.
 */
#ifndef PARITY_BRIDGE_H
#define PARITY_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF-BEGIN */
enum {
    PARITY_OK = 0,
    PARITY_E_INVALID = 1,   /* bad argument: NULL pointer, negative count, token id out of range */
    PARITY_E_LOAD = 2,      /* the model or context could not be created */
    PARITY_E_DECODE = 3,    /* llama_decode failed */
    PARITY_E_BUFFER = 4,    /* an output buffer is too small: the needed size is reported */
    PARITY_E_TOKENIZE = 5,  /* tokenization failed */
    PARITY_E_UNSUPPORTED = 6
};

typedef struct parity_model parity_model;

typedef struct {
    int32_t n_ctx;        /* context size in tokens (> 0) */
    int32_t n_threads;    /* threads for single-token and batch evaluation (> 0) */
    int32_t n_batch;      /* logical batch: the longest sequence one evaluation accepts */
    int32_t n_ubatch;     /* physical batch */
    int32_t type_k;       /* ggml_type of the K cache: 0 = F32, 1 = F16 */
    int32_t type_v;       /* ggml_type of the V cache */
    int32_t flash_attn;   /* 0 off, 1 on, -1 auto (mainline only) */
    uint32_t seed;        /* recorded; passed to the context where the API still takes one */
    int32_t vocab_only;   /* 1: load only the vocabulary (tokenizer checks) */
    int32_t repack;       /* weight repacking (llama_model_params.use_extra_bufts): 1 on (llama.cpp's default),
                             0 off; PARITY_E_UNSUPPORTED for 0 where the llama.h has no such switch (2024 API) */
} parity_params;

typedef struct {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_ctx;
    int32_t n_embd;
    int32_t n_layer;
    int32_t bos;
    int32_t eos;
    int32_t add_bos;
    char architecture[64];
} parity_info;

int parity_api_generation(void);            /* 1 = bitnet.cpp fork (2024 llama.h), 2 = mainline */
const char * parity_system_info(void);      /* llama_print_system_info() */
void parity_set_log_level(int level);       /* 0 silent, 1 errors, 2 warnings, 3 info, 4 debug */

int parity_open(const char * path, const parity_params * params, parity_model ** out, char * err, size_t err_len);
void parity_close(parity_model * m);
int parity_model_info(parity_model * m, parity_info * out, char * err, size_t err_len);
/* Copies the GGUF metadata value of `key` (e.g. "tokenizer.chat_template"); *n_out gets its full length,
 * -1 when the key is absent. */
int parity_meta_str(parity_model * m, const char * key, char * buf, size_t buf_len, int32_t * n_out,
                    char * err, size_t err_len);

int parity_tokenize(parity_model * m, const char * text, int32_t text_len, int32_t add_special,
                    int32_t parse_special, int32_t * out, int32_t cap, int32_t * n_out, char * err, size_t err_len);
/* The text of one token, special tokens rendered. */
int parity_token_piece(parity_model * m, int32_t token, char * buf, int32_t cap, int32_t * n_out,
                       char * err, size_t err_len);
int parity_detokenize(parity_model * m, const int32_t * tokens, int32_t n_tokens, char * buf, int32_t cap,
                      int32_t * n_out, char * err, size_t err_len);

/* Logits for every position of `tokens`, evaluated in ONE llama_decode from an empty cache.
 * out_logits holds n_tokens * n_vocab floats, row-major by position. */
int parity_eval(parity_model * m, const int32_t * tokens, int32_t n_tokens, float * out_logits,
                char * err, size_t err_len);
/* Logits of the positions `rows` only (n_rows of them, strictly increasing within [0, n_tokens)), from the same
 * ONE llama_decode as parity_eval, with only those positions marked for output: llama.cpp computes the output
 * head (and, in most graphs, the last layer after its attention) for those rows only. out_logits holds
 * n_rows * n_vocab floats, row k = position rows[k]. A row's values may differ from parity_eval's in the last
 * bits (the matrix products see fewer rows); llama-perplexity's KL-divergence mode evaluates this way. */
int parity_eval_rows(parity_model * m, const int32_t * tokens, int32_t n_tokens, const int32_t * rows, int32_t n_rows,
                     float * out_logits, char * err, size_t err_len);
/* Logits evaluating one token per llama_decode (positions 0..n-1), from an empty cache. */
int parity_eval_stepwise(parity_model * m, const int32_t * tokens, int32_t n_tokens, float * out_logits,
                         char * err, size_t err_len);
/* Greedy continuation: decode the prompt in one batch, then n_new single-token decodes taking the argmax. */
int parity_greedy(parity_model * m, const int32_t * prompt, int32_t n_prompt, int32_t n_new, int32_t * out_tokens,
                  char * err, size_t err_len);

/* llama.cpp's built-in (non-Jinja) chat formatter, llama_chat_apply_template: the conversation roles[i] /
 * contents[i] formatted with the template `tmpl` (Jinja source, detected by llama.cpp's heuristics, or a built-in
 * name such as "chatml"); add_ass appends the assistant prefix. *n_out gets the full length in bytes (more than
 * cap: call again with a larger buffer), or -1 when llama.cpp does not recognise the template.
 * PARITY_E_UNSUPPORTED when the backend's llama.h has no llama_chat_apply_template. */
int parity_chat_apply_template(const char * tmpl, const char * const * roles, const char * const * contents,
                               int32_t n_msg, int32_t add_ass, char * buf, int32_t cap, int32_t * n_out,
                               char * err, size_t err_len);

/* ggml's own dequantizer for `type` (to_float of its type traits): for bit-exact tests of parity's.
 * `src` holds `src_len` bytes, which must be exactly ggml_row_size(type, n_elements) (n_elements a multiple
 * of the type's block size); anything else is PARITY_E_INVALID, never a read past the buffer. */
int parity_dequantize(int32_t type, const void * src, size_t src_len, int64_t n_elements, float * dst,
                      char * err, size_t err_len);
/* Graph tensor capture (issue 14, localisation), through llama.cpp's eval callback (cb_eval).
 *
 * parity_capture_run evaluates `tokens` in ONE llama_decode from an empty cache, exactly as parity_eval
 * (out_logits, unless NULL, gets the same n_tokens * n_vocab floats), and meanwhile:
 *  - lists every per-token tensor the graph computed (parity_capture_names): a named node of type
 *    F32/F16/BF16 whose outermost non-unit dimension is the micro-batch's token count (every node when the
 *    micro-batch holds one token); ggml's derived names ("... (view)", "(reshaped)", ...) are left out;
 *  - records the `n_names` tensors named exactly in `names` as float32 rows (n_tokens, width): a tensor with
 *    more dimensions per token is flattened per row in ggml order; views are read through their strides;
 *    F16/BF16 are converted. When n_ubatch < n_tokens llama.cpp computes one graph per micro-batch and the
 *    rows of each are concatenated in token order. A name the graph gives to several nodes (an architecture
 *    may name a tensor before and after an op) is recorded at its LAST computed node of the micro-batch, as
 *    eval-callback users expect; `occurrences` says how many nodes carried it;
 *  - teacher forcing: for each of the `n_replace` names, after the graph computes that tensor (its last
 *    node, as above) its value is recorded (when also listed in `names`) and then overwritten with
 *    replace_data[i] (n_tokens rows of replace_width[i] floats, row-major) before any op downstream reads
 *    it. Only F32, contiguous tensors in host memory can be overwritten (PARITY_E_UNSUPPORTED otherwise).
 *    Knowing which node is the last one needs the graph's name census: the first call with a replacement
 *    on a model runs one extra decode to take it (kept for the model's lifetime).
 * Memory is bounded by `max_bytes` (the recorded floats): over it, PARITY_E_BUFFER and a message with the
 * size needed. A name in `names` or `replace_names` that the graph did not compute as a per-token tensor
 * is PARITY_E_INVALID naming it. On success *out holds the results until parity_capture_free. */
typedef struct parity_capture parity_capture;

int parity_capture_run(parity_model * m, const int32_t * tokens, int32_t n_tokens, const char * const * names,
                       int32_t n_names, const char * const * replace_names, const float * const * replace_data,
                       const int64_t * replace_width, int32_t n_replace, uint64_t max_bytes, float * out_logits,
                       parity_capture ** out, char * err, size_t err_len);
/* Newline-separated per-token tensor names the graph computed, in the order first computed. */
const char * parity_capture_names(const parity_capture * c);
int32_t parity_capture_count(const parity_capture * c);  /* recorded tensors, in the order of `names` */
int parity_capture_tensor(const parity_capture * c, int32_t i, const char ** name, int32_t * n_rows,
                          int64_t * width, int32_t * occurrences, const float ** data, char * err, size_t err_len);
void parity_capture_free(parity_capture * c);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* PARITY_BRIDGE_H */
