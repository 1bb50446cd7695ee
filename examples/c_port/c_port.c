/* c_port.c - a llama forward pass in plain C that speaks parity's implementation protocol v2.
 *
 * One file, C11, libc + libm only:   cc -O2 -std=c11 -o c_port c_port.c -lm
 * Planted bug for parity to catch:   cc -O2 -std=c11 -DPLANTED_BUG=rope -o c_port_bug c_port.c -lm
 *   (layer 1 rotates NEOX pairs (i, i + n_rot/2) instead of llama's adjacent pairs (2i, 2i + 1)).
 *
 * It reads an F32 llama GGUF itself (header, metadata, tensor infos, alignment, data) and answers
 * hello / logits / greedy / tensors / bye on stdin/stdout as docs/PROTOCOL.md specifies (tensors: its named
 * graph tensors in llama.cpp's naming, with teacher forcing). Logs go to stderr only.
 *
 * The float order follows llama.cpp/ggml where that is cheap (as parity's numpy engine does):
 *  - RMSNorm squares in float, sums in double, scale = 1.0f / sqrtf(mean + eps), then (x * scale) * w;
 *  - RoPE angles by repeated multiplication with theta_scale = powf(base, -2.0f / n_rot), in float,
 *    cos/sin evaluated in double and rounded to float;
 *  - attention scores (q.k) * kq_scale with kq_scale = 1.0f / sqrtf(head_dim); softmax sums exp in double;
 *  - SiLU as x / (1.0f + expf(-x)).
 * Dot products accumulate in double and round once (ggml's SIMD float order is not reproducible anyway).
 */

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define C_PORT_NAME "c_port"
#define C_PORT_VERSION "0.1"
#define PROTOCOL_VERSION 2

/* -DPLANTED_BUG=rope: `rope` is not a macro, so compare the stringified value. */
#define C_PORT_STR2(x) #x
#define C_PORT_STR(x) C_PORT_STR2(x)
#ifdef PLANTED_BUG
static const char *planted_bug = C_PORT_STR(PLANTED_BUG);
#else
static const char *planted_bug = "";
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Errors: one line in g_err, functions return -1.                                                   */

static char g_err[1024];

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    for (char *c = g_err; *c; c++) {
        if (*c == '\n' || *c == '\r') *c = ' ';
    }
    return -1;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "c_port: out of memory (%zu bytes)\n", n);
        exit(70);
    }
    return p;
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "c_port: out of memory (%zu x %zu bytes)\n", n, size);
        exit(70);
    }
    return p;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "c_port: out of memory (%zu bytes)\n", n);
        exit(70);
    }
    return q;
}

/* ------------------------------------------------------------------------------------------------ */
/* Growable byte buffer (reply headers).                                                             */

typedef struct {
    char *s;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        b->s = xrealloc(b->s, cap);
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void buf_puts(buf_t *b, const char *s) { buf_put(b, s, strlen(s)); }

static void buf_printf(buf_t *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string literal; bytes >= 0x80 pass through (UTF-8 in, UTF-8 out). */
static void buf_json_str(buf_t *b, const char *s) {
    buf_puts(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': buf_puts(b, "\\\""); break;
        case '\\': buf_puts(b, "\\\\"); break;
        case '\n': buf_puts(b, "\\n"); break;
        case '\r': buf_puts(b, "\\r"); break;
        case '\t': buf_puts(b, "\\t"); break;
        default:
            if (*p < 0x20) buf_printf(b, "\\u%04x", *p);
            else buf_put(b, (const char *)p, 1);
        }
    }
    buf_puts(b, "\"");
}

/* ------------------------------------------------------------------------------------------------ */
/* A small JSON reader: enough for parity's request headers (one object per line).                    */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype_t;

typedef struct jval {
    jtype_t t;
    int b;              /* J_BOOL */
    double num;         /* J_NUM */
    int is_int;         /* J_NUM written without fraction/exponent and fits in long long */
    long long i;        /* J_NUM when is_int */
    char *s;            /* J_STR (NUL-terminated; embedded NULs are rejected) */
    size_t n;           /* J_ARR / J_OBJ element count */
    struct jval *items; /* J_ARR / J_OBJ values */
    char **keys;        /* J_OBJ keys */
} jval;

typedef struct {
    const char *p, *end;
    int depth;
} jparser;

#define JSON_MAX_DEPTH 64

static void jfree(jval *v) {
    if (!v) return;
    free(v->s);
    for (size_t k = 0; k < v->n; k++) {
        jfree(&v->items[k]);
        if (v->keys) free(v->keys[k]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof *v);
}

static void jskip_ws(jparser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

static int jhex4(jparser *ps, unsigned *out) {
    if (ps->end - ps->p < 4) return fail("bad JSON: truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        char c = *ps->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return fail("bad JSON: invalid \\u escape");
    }
    *out = v;
    return 0;
}

static void put_utf8(buf_t *b, unsigned cp) {
    char u[4];
    if (cp < 0x80) {
        u[0] = (char)cp;
        buf_put(b, u, 1);
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        buf_put(b, u, 2);
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        buf_put(b, u, 3);
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        buf_put(b, u, 4);
    }
}

static int jparse_string(jparser *ps, char **out) {
    buf_t b = {0};
    buf_put(&b, "", 0);
    ps->p++; /* opening quote */
    for (;;) {
        if (ps->p >= ps->end) {
            free(b.s);
            return fail("bad JSON: unterminated string");
        }
        unsigned char c = (unsigned char)*ps->p++;
        if (c == '"') break;
        if (c < 0x20) {
            free(b.s);
            return fail("bad JSON: control character in string");
        }
        if (c != '\\') {
            buf_put(&b, (const char *)&c, 1);
            continue;
        }
        if (ps->p >= ps->end) {
            free(b.s);
            return fail("bad JSON: unterminated escape");
        }
        char e = *ps->p++;
        unsigned cp;
        switch (e) {
        case '"': buf_puts(&b, "\""); break;
        case '\\': buf_puts(&b, "\\"); break;
        case '/': buf_puts(&b, "/"); break;
        case 'b': buf_puts(&b, "\b"); break;
        case 'f': buf_puts(&b, "\f"); break;
        case 'n': buf_puts(&b, "\n"); break;
        case 'r': buf_puts(&b, "\r"); break;
        case 't': buf_puts(&b, "\t"); break;
        case 'u':
            if (jhex4(ps, &cp)) {
                free(b.s);
                return -1;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* high surrogate: a low one must follow */
                unsigned lo;
                if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u') {
                    free(b.s);
                    return fail("bad JSON: lone surrogate in string");
                }
                ps->p += 2;
                if (jhex4(ps, &lo)) {
                    free(b.s);
                    return -1;
                }
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    free(b.s);
                    return fail("bad JSON: invalid surrogate pair in string");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                free(b.s);
                return fail("bad JSON: lone surrogate in string");
            }
            if (cp == 0) {
                free(b.s);
                return fail("bad JSON: NUL character in string");
            }
            put_utf8(&b, cp);
            break;
        default:
            free(b.s);
            return fail("bad JSON: invalid escape '\\%c'", e);
        }
    }
    *out = b.s;
    return 0;
}

static int jparse_number(jparser *ps, jval *v) {
    const char *start = ps->p, *q = ps->p;
    int integral = 1;
    if (q < ps->end && *q == '-') q++;
    if (q >= ps->end) return fail("bad JSON: truncated number");
    if (*q == '0') q++;
    else if (*q >= '1' && *q <= '9') while (q < ps->end && *q >= '0' && *q <= '9') q++;
    else return fail("bad JSON: invalid number");
    if (q < ps->end && *q == '.') {
        integral = 0;
        q++;
        if (q >= ps->end || *q < '0' || *q > '9') return fail("bad JSON: invalid number");
        while (q < ps->end && *q >= '0' && *q <= '9') q++;
    }
    if (q < ps->end && (*q == 'e' || *q == 'E')) {
        integral = 0;
        q++;
        if (q < ps->end && (*q == '+' || *q == '-')) q++;
        if (q >= ps->end || *q < '0' || *q > '9') return fail("bad JSON: invalid number");
        while (q < ps->end && *q >= '0' && *q <= '9') q++;
    }
    size_t len = (size_t)(q - start);
    char tmp[64];
    if (len >= sizeof tmp) {
        if (integral) return fail("bad JSON: integer too large");
        len = sizeof tmp - 1; /* a very long fraction: the leading digits decide the double anyway */
    }
    memcpy(tmp, start, len);
    tmp[len] = '\0';
    v->t = J_NUM;
    v->num = strtod(tmp, NULL);
    if (integral) {
        errno = 0;
        long long i = strtoll(tmp, NULL, 10);
        if (errno == 0) {
            v->is_int = 1;
            v->i = i;
        }
    }
    ps->p = q;
    return 0;
}

static int jparse_value(jparser *ps, jval *v);

static int jparse_container(jparser *ps, jval *v, int object) {
    if (++ps->depth > JSON_MAX_DEPTH) return fail("bad JSON: nested deeper than %d", JSON_MAX_DEPTH);
    char close = object ? '}' : ']';
    size_t cap = 0;
    v->t = object ? J_OBJ : J_ARR;
    ps->p++; /* opening bracket */
    jskip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return 0;
    }
    for (;;) {
        if (v->n == cap) {
            cap = cap ? 2 * cap : 8;
            v->items = xrealloc(v->items, cap * sizeof *v->items);
            if (object) v->keys = xrealloc(v->keys, cap * sizeof *v->keys);
        }
        memset(&v->items[v->n], 0, sizeof v->items[v->n]);
        jskip_ws(ps);
        if (object) {
            v->keys[v->n] = NULL;
            if (ps->p >= ps->end || *ps->p != '"') return fail("bad JSON: expected a string key");
            if (jparse_string(ps, &v->keys[v->n])) return -1;
            jskip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                v->n++; /* so jfree frees the key */
                return fail("bad JSON: expected ':' after a key");
            }
            ps->p++;
        }
        int rc = jparse_value(ps, &v->items[v->n]);
        v->n++;
        if (rc) return -1;
        jskip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            ps->depth--;
            return 0;
        }
        return fail("bad JSON: expected ',' or '%c'", close);
    }
}

static int jparse_value(jparser *ps, jval *v) {
    jskip_ws(ps);
    if (ps->p >= ps->end) return fail("bad JSON: unexpected end of line");
    char c = *ps->p;
    size_t left = (size_t)(ps->end - ps->p);
    if (c == '{') return jparse_container(ps, v, 1);
    if (c == '[') return jparse_container(ps, v, 0);
    if (c == '"') {
        v->t = J_STR;
        return jparse_string(ps, &v->s);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return jparse_number(ps, v);
    if (left >= 4 && memcmp(ps->p, "true", 4) == 0) {
        v->t = J_BOOL;
        v->b = 1;
        ps->p += 4;
        return 0;
    }
    if (left >= 5 && memcmp(ps->p, "false", 5) == 0) {
        v->t = J_BOOL;
        ps->p += 5;
        return 0;
    }
    if (left >= 4 && memcmp(ps->p, "null", 4) == 0) {
        v->t = J_NULL;
        ps->p += 4;
        return 0;
    }
    return fail("bad JSON: unexpected character '%c'", c);
}

/* Parse exactly one JSON value spanning [s, s+len). */
static int json_parse(const char *s, size_t len, jval *out) {
    jparser ps = {s, s + len, 0};
    memset(out, 0, sizeof *out);
    if (jparse_value(&ps, out)) {
        jfree(out);
        return -1;
    }
    jskip_ws(&ps);
    if (ps.p != ps.end) {
        jfree(out);
        return fail("bad JSON: trailing characters after the object");
    }
    return 0;
}

static const jval *jget(const jval *obj, const char *key) {
    if (!obj || obj->t != J_OBJ) return NULL;
    for (size_t k = 0; k < obj->n; k++) {
        if (strcmp(obj->keys[k], key) == 0) return &obj->items[k];
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------------ */
/* GGUF v2/v3 reader (little-endian files).                                                          */

enum {
    GT_UINT8, GT_INT8, GT_UINT16, GT_INT16, GT_UINT32, GT_INT32, GT_FLOAT32, GT_BOOL,
    GT_STRING, GT_ARRAY, GT_UINT64, GT_INT64, GT_FLOAT64, GT_COUNT
};

typedef struct {
    char *key;
    int type;
    int is_num;     /* integer, float or bool scalar */
    int is_float;   /* GT_FLOAT32 / GT_FLOAT64 */
    int is_signed;  /* GT_INT* */
    uint64_t u;     /* unsigned integers, bools */
    int64_t i;      /* signed integers */
    double f;       /* floats */
    char *str;      /* GT_STRING */
    int arr_type;   /* GT_ARRAY */
    uint64_t arr_n; /* GT_ARRAY */
} gkv_t;

typedef struct {
    char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset; /* from the start of the data section */
    uint64_t nbytes; /* 0 for types c_port does not know the size of */
} gtensor_t;

typedef struct {
    unsigned char *data; /* the whole file */
    size_t size;
    uint64_t n_kv, n_tensors;
    gkv_t *kv;
    gtensor_t *tensors;
    uint64_t data_start;
    uint64_t alignment;
} gguf_t;

typedef struct {
    const unsigned char *p;
    size_t size, pos;
    const char *path;
} rd_t;

static int rd_need(rd_t *r, uint64_t n, const char *what) {
    if (n > r->size - r->pos) return fail("%s: truncated file while reading %s at byte %zu", r->path, what, r->pos);
    return 0;
}

static uint64_t le_bytes(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; k--) v = (v << 8) | p[k];
    return v;
}

static int rd_uint(rd_t *r, int nbytes, uint64_t *out, const char *what) {
    if (rd_need(r, (uint64_t)nbytes, what)) return -1;
    *out = le_bytes(r->p + r->pos, nbytes);
    r->pos += (size_t)nbytes;
    return 0;
}

static int rd_u32(rd_t *r, uint32_t *out, const char *what) {
    uint64_t v;
    if (rd_uint(r, 4, &v, what)) return -1;
    *out = (uint32_t)v;
    return 0;
}

static int rd_str(rd_t *r, char **out, const char *what) {
    uint64_t n;
    if (rd_uint(r, 8, &n, what) || rd_need(r, n, what)) return -1;
    if (memchr(r->p + r->pos, 0, (size_t)n)) return fail("%s: %s contains a NUL byte", r->path, what);
    *out = xmalloc((size_t)n + 1);
    memcpy(*out, r->p + r->pos, (size_t)n);
    (*out)[n] = '\0';
    r->pos += (size_t)n;
    return 0;
}

static int rd_skip_str(rd_t *r, const char *what) {
    uint64_t n;
    if (rd_uint(r, 8, &n, what) || rd_need(r, n, what)) return -1;
    r->pos += (size_t)n;
    return 0;
}

static const int gtype_size[GT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static double f64_from_bits(uint64_t u) {
    double f;
    memcpy(&f, &u, 8);
    return f;
}

static int rd_scalar(rd_t *r, int type, gkv_t *kv) {
    uint64_t raw;
    if (rd_uint(r, gtype_size[type], &raw, kv->key)) return -1;
    kv->is_num = 1;
    switch (type) {
    case GT_INT8: kv->is_signed = 1; kv->i = (int8_t)(uint8_t)raw; break;
    case GT_INT16: kv->is_signed = 1; kv->i = (int16_t)(uint16_t)raw; break;
    case GT_INT32: kv->is_signed = 1; kv->i = (int32_t)(uint32_t)raw; break;
    case GT_INT64: kv->is_signed = 1; kv->i = (int64_t)raw; break;
    case GT_FLOAT32: kv->is_float = 1; kv->f = f32_from_bits((uint32_t)raw); break;
    case GT_FLOAT64: kv->is_float = 1; kv->f = f64_from_bits(raw); break;
    case GT_BOOL:
        if (raw > 1) return fail("%s: key '%s' is a bool with value %llu", r->path, kv->key, (unsigned long long)raw);
        kv->u = raw;
        break;
    default: kv->u = raw; break;
    }
    return 0;
}

static void gguf_free(gguf_t *g) {
    if (!g) return;
    for (uint64_t k = 0; g->kv && k < g->n_kv; k++) {
        free(g->kv[k].key);
        free(g->kv[k].str);
    }
    for (uint64_t k = 0; g->tensors && k < g->n_tensors; k++) free(g->tensors[k].name);
    free(g->kv);
    free(g->tensors);
    free(g->data);
    memset(g, 0, sizeof *g);
}

static const gkv_t *gguf_kv(const gguf_t *g, const char *key) {
    for (uint64_t k = 0; k < g->n_kv; k++) {
        if (g->kv[k].key && strcmp(g->kv[k].key, key) == 0) return &g->kv[k];
    }
    return NULL;
}

static const gtensor_t *gguf_tensor(const gguf_t *g, const char *name) {
    for (uint64_t k = 0; k < g->n_tensors; k++) {
        if (strcmp(g->tensors[k].name, name) == 0) return &g->tensors[k];
    }
    return NULL;
}

static int read_file(const char *path, unsigned char **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail("cannot open model '%s': %s", path, strerror(errno));
    size_t cap = 1 << 20, len = 0;
    unsigned char *buf = xmalloc(cap);
    for (;;) {
        if (len == cap) {
            cap *= 2;
            buf = xrealloc(buf, cap);
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return fail("cannot read model '%s'", path);
    }
    *data = buf;
    *size = len;
    return 0;
}

/* Bytes per block and elements per block of the ggml types whose layout is fixed (ggml.c type_traits). */
static int ggml_type_size(uint32_t type, uint64_t *bytes, uint64_t *blck) {
    static const struct { uint32_t type, bytes, blck; } sizes[] = {
        {0, 4, 1}, {1, 2, 1}, {2, 18, 32}, {3, 20, 32}, {6, 22, 32}, {7, 24, 32}, {8, 34, 32}, {9, 36, 32},
        {10, 84, 256}, {11, 110, 256}, {12, 144, 256}, {13, 176, 256}, {14, 210, 256}, {15, 292, 256},
        {24, 1, 1}, {25, 2, 1}, {26, 4, 1}, {27, 8, 1}, {28, 8, 1}, {30, 2, 1},
    };
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        if (sizes[k].type == type) {
            *bytes = sizes[k].bytes;
            *blck = sizes[k].blck;
            return 0;
        }
    }
    return -1;
}

static int gguf_open(const char *path, gguf_t *g) {
    memset(g, 0, sizeof *g);
    if (read_file(path, &g->data, &g->size)) return -1;
    rd_t r = {g->data, g->size, 0, path};
    uint32_t magic, version;
    if (rd_u32(&r, &magic, "the magic") || rd_u32(&r, &version, "the version")) return -1;
    if (memcmp(g->data, "GGUF", 4) != 0) return fail("%s: not a GGUF file (bad magic)", path);
    if (version != 2 && version != 3) return fail("%s: GGUF version %u is not supported (2, 3)", path, version);
    if (rd_uint(&r, 8, &g->n_tensors, "the tensor count") || rd_uint(&r, 8, &g->n_kv, "the key count")) return -1;
    /* every KV takes >= 12 bytes and every tensor info >= 24: bounds the allocations by the file size */
    if (g->n_kv > g->size / 12 || g->n_tensors > g->size / 24)
        return fail("%s: %llu keys / %llu tensors cannot fit in %zu bytes", path, (unsigned long long)g->n_kv,
                    (unsigned long long)g->n_tensors, g->size);
    g->kv = xcalloc((size_t)g->n_kv, sizeof *g->kv);
    g->tensors = xcalloc((size_t)g->n_tensors, sizeof *g->tensors);
    g->alignment = 32;
    for (uint64_t k = 0; k < g->n_kv; k++) {
        gkv_t *kv = &g->kv[k];
        uint32_t type;
        if (rd_str(&r, &kv->key, "a metadata key") || rd_u32(&r, &type, kv->key)) return -1;
        for (uint64_t j = 0; j < k; j++) {
            if (strcmp(g->kv[j].key, kv->key) == 0) return fail("%s: duplicate key '%s'", path, kv->key);
        }
        if (type >= GT_COUNT) return fail("%s: key '%s' has invalid type %u", path, kv->key, type);
        kv->type = (int)type;
        if (type == GT_STRING) {
            if (rd_str(&r, &kv->str, kv->key)) return -1;
        } else if (type == GT_ARRAY) {
            uint32_t at;
            if (rd_u32(&r, &at, kv->key) || rd_uint(&r, 8, &kv->arr_n, kv->key)) return -1;
            if (at >= GT_COUNT || at == GT_ARRAY)
                return fail("%s: array key '%s' has invalid element type %u", path, kv->key, at);
            kv->arr_type = (int)at;
            if (at == GT_STRING) {
                for (uint64_t e = 0; e < kv->arr_n; e++) {
                    if (rd_skip_str(&r, kv->key)) return -1;
                }
            } else {
                uint64_t es = (uint64_t)gtype_size[at];
                if (kv->arr_n > (r.size - r.pos) / es) return fail("%s: array '%s' runs past the end of the file", path, kv->key);
                r.pos += (size_t)(kv->arr_n * es);
            }
        } else if (rd_scalar(&r, (int)type, kv)) {
            return -1;
        }
    }
    const gkv_t *al = gguf_kv(g, "general.alignment");
    if (al) {
        if (al->type != GT_UINT32 || al->u == 0 || (al->u & (al->u - 1)) != 0)
            return fail("%s: general.alignment must be a uint32 power of two", path);
        g->alignment = al->u;
    }
    uint64_t expect = 0;
    int unchecked = 0;
    for (uint64_t k = 0; k < g->n_tensors; k++) {
        gtensor_t *t = &g->tensors[k];
        if (rd_str(&r, &t->name, "a tensor name") || rd_u32(&r, &t->n_dims, t->name)) return -1;
        for (uint64_t j = 0; j < k; j++) {
            if (strcmp(g->tensors[j].name, t->name) == 0) return fail("%s: duplicate tensor '%s'", path, t->name);
        }
        if (t->n_dims > 4) return fail("%s: tensor '%s' has %u dimensions (at most 4)", path, t->name, t->n_dims);
        uint64_t count = 1;
        for (uint32_t d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (rd_uint(&r, 8, &t->ne[d], t->name)) return -1;
            if (t->ne[d] > INT64_MAX || (t->ne[d] != 0 && count > (uint64_t)INT64_MAX / t->ne[d]))
                return fail("%s: tensor '%s' has an overflowing shape", path, t->name);
            count *= t->ne[d];
        }
        if (rd_u32(&r, &t->type, t->name) || rd_uint(&r, 8, &t->offset, t->name)) return -1;
        uint64_t bytes, blck;
        if (ggml_type_size(t->type, &bytes, &blck) == 0) {
            if (t->ne[0] % blck) return fail("%s: tensor '%s' row length is not a multiple of its block size", path, t->name);
            if (count / blck > (uint64_t)INT64_MAX / bytes) return fail("%s: tensor '%s' is too large", path, t->name);
            t->nbytes = count / blck * bytes;
            if (!unchecked && t->offset != expect)
                return fail("%s: tensor '%s' is at data offset %llu, expected %llu", path, t->name,
                            (unsigned long long)t->offset, (unsigned long long)expect);
            expect = t->offset + (t->nbytes + g->alignment - 1) / g->alignment * g->alignment;
        } else {
            unchecked = 1; /* a type c_port does not know the size of: later offsets cannot be checked */
            if (t->offset % g->alignment)
                return fail("%s: tensor '%s' offset is not a multiple of the alignment", path, t->name);
        }
    }
    g->data_start = (r.pos + g->alignment - 1) / g->alignment * g->alignment;
    for (uint64_t k = 0; k < g->n_tensors; k++) {
        const gtensor_t *t = &g->tensors[k];
        if (t->nbytes && (t->offset > g->size || g->data_start > g->size - t->offset ||
                             t->nbytes > g->size - g->data_start - t->offset))
            return fail("%s: tensor '%s' data runs past the end of the file", path, t->name);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* The llama model.                                                                                   */

typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down;
    float *bq, *bk, *bv, *bo, *b_gate, *b_up, *b_down; /* optional biases (NULL when absent) */
} layer_t;

typedef struct {
    int n_vocab, n_embd, n_layer, n_ff, n_head, n_head_kv, head_dim, n_rot, n_ctx;
    float rms_eps, rope_base, freq_scale;
    float *tok_embd, *output_norm, *output, *rope_freqs;
    layer_t *layers;
    float **owned; /* every allocated tensor, for model_free */
    size_t n_owned;
    char *path;
} model_t;

static void model_free(model_t *m) {
    for (size_t k = 0; k < m->n_owned; k++) free(m->owned[k]);
    free(m->owned);
    free(m->layers);
    free(m->path);
    memset(m, 0, sizeof *m);
}

static const char *ggml_type_name(uint32_t t) {
    static const char *names[] = {"f32", "f16", "q4_0", "q4_1", "type4", "type5", "q5_0", "q5_1", "q8_0",
                                  "q8_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k"};
    if (t < sizeof names / sizeof names[0]) return names[t];
    if (t == 30) return "bf16";
    return "non-f32";
}

/* A u32 hyperparameter >= min (any integer type whose value fits), or `def` when absent (def < 0: required). */
static int hp_int(const gguf_t *g, const char *arch, const char *suffix, long def, long min, int *out) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    const gkv_t *kv = gguf_kv(g, key);
    if (!kv) {
        if (def < 0) return fail("model: required key '%s' is missing", key);
        *out = (int)def;
        return 0;
    }
    if (!kv->is_num || kv->is_float || kv->type == GT_BOOL) return fail("model: key '%s' is not an integer", key);
    if (kv->is_signed ? (kv->i < min || kv->i > INT_MAX) : (kv->u < (uint64_t)min || kv->u > INT_MAX))
        return fail("model: key '%s' is out of range (>= %ld)", key, min);
    *out = kv->is_signed ? (int)kv->i : (int)kv->u;
    return 0;
}

static int hp_float(const gguf_t *g, const char *arch, const char *suffix, double def, int required, float *out) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    const gkv_t *kv = gguf_kv(g, key);
    if (!kv) {
        if (required) return fail("model: required key '%s' is missing", key);
        *out = (float)def;
        return 0;
    }
    if (!kv->is_float) return fail("model: key '%s' is not a float", key);
    float v = (float)kv->f;
    if (!isfinite(v) || v < 0.0f) return fail("model: key '%s' is not a finite float >= 0", key);
    *out = v;
    return 0;
}

/* Copy an F32 tensor of ggml shape [ne0, ne1] (ne1 = 1 for vectors) out of the file. */
static int load_f32(model_t *m, const gguf_t *g, const char *name, uint64_t ne0, uint64_t ne1, int required,
                    float **out) {
    const gtensor_t *t = gguf_tensor(g, name);
    *out = NULL;
    if (!t) return required ? fail("model: tensor '%s' is missing", name) : 0;
    if (t->type != 0)
        return fail("model: tensor '%s' has type %s; c_port reads F32 tensors only (use the f32 variant)", name,
                    ggml_type_name(t->type));
    uint32_t want_dims = ne1 == 1 ? 1 : 2;
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1 ||
        (t->n_dims != want_dims && !(t->n_dims == 2 && want_dims == 1)))
        return fail("model: tensor '%s' has shape [%llu, %llu], expected [%llu, %llu] from the metadata", name,
                    (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (unsigned long long)ne0,
                    (unsigned long long)ne1);
    size_t count = (size_t)(ne0 * ne1);
    float *dst = xmalloc(count * sizeof(float));
    const unsigned char *src = g->data + g->data_start + t->offset;
    for (size_t k = 0; k < count; k++) dst[k] = f32_from_bits((uint32_t)le_bytes(src + 4 * k, 4));
    m->owned = xrealloc(m->owned, (m->n_owned + 1) * sizeof *m->owned);
    m->owned[m->n_owned++] = dst;
    *out = dst;
    return 0;
}

static int model_load_from(model_t *m, const gguf_t *g) {
    const gkv_t *a = gguf_kv(g, "general.architecture");
    if (!a || a->type != GT_STRING) return fail("model: 'general.architecture' is missing");
    if (strcmp(a->str, "llama") != 0) return fail("model: architecture '%s' is not supported (c_port runs llama)", a->str);
    const char *arch = a->str;
    if (hp_int(g, arch, "embedding_length", -1, 1, &m->n_embd) || hp_int(g, arch, "block_count", -1, 1, &m->n_layer) ||
        hp_int(g, arch, "feed_forward_length", -1, 1, &m->n_ff) ||
        hp_int(g, arch, "attention.head_count", -1, 1, &m->n_head) ||
        hp_int(g, arch, "context_length", -1, 1, &m->n_ctx))
        return -1;
    if (hp_int(g, arch, "attention.head_count_kv", m->n_head, 1, &m->n_head_kv)) return -1;
    if (hp_int(g, arch, "attention.key_length", m->n_embd / m->n_head > 0 ? m->n_embd / m->n_head : 1, 1, &m->head_dim))
        return -1;
    int v_len;
    if (hp_int(g, arch, "attention.value_length", m->head_dim, 1, &v_len)) return -1;
    if (v_len != m->head_dim) return fail("model: value_length %d differs from key_length %d", v_len, m->head_dim);
    if (hp_int(g, arch, "rope.dimension_count", m->head_dim, 1, &m->n_rot)) return -1;
    if (m->n_rot != m->head_dim || m->n_rot % 2)
        return fail("model: rope.dimension_count %d must equal the head dimension %d", m->n_rot, m->head_dim);
    if (m->n_head % m->n_head_kv) return fail("model: head_count %d is not a multiple of head_count_kv %d", m->n_head, m->n_head_kv);
    if (hp_float(g, arch, "attention.layer_norm_rms_epsilon", 0.0, 1, &m->rms_eps) ||
        hp_float(g, arch, "rope.freq_base", 10000.0, 0, &m->rope_base))
        return -1;
    char key[256];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    const gkv_t *st = gguf_kv(g, key);
    if (st && (st->type != GT_STRING || (strcmp(st->str, "none") != 0 && strcmp(st->str, "linear") != 0)))
        return fail("model: rope scaling type is not supported by c_port (none, linear)");
    float factor;
    if (hp_float(g, arch, "rope.scaling.factor", 0.0, 0, &factor)) return -1;
    if (factor == 0.0f && hp_float(g, arch, "rope.scale_linear", 0.0, 0, &factor)) return -1;
    m->freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;

    const gtensor_t *te = gguf_tensor(g, "token_embd.weight");
    if (!te) return fail("model: tensor 'token_embd.weight' is missing");
    if (te->n_dims != 2 || te->ne[1] == 0 || te->ne[1] > INT_MAX) return fail("model: 'token_embd.weight' is not a matrix");
    m->n_vocab = (int)te->ne[1];
    uint64_t d = (uint64_t)m->n_embd, f = (uint64_t)m->n_ff, qo = (uint64_t)m->n_head * (uint64_t)m->head_dim,
             kvo = (uint64_t)m->n_head_kv * (uint64_t)m->head_dim, V = (uint64_t)m->n_vocab;
    if (load_f32(m, g, "token_embd.weight", d, V, 1, &m->tok_embd)) return -1;
    m->layers = xcalloc((size_t)m->n_layer, sizeof *m->layers);
    for (int i = 0; i < m->n_layer; i++) {
        layer_t *L = &m->layers[i];
        char n[128];
#define T(field, suffix, ne0, ne1, req)                             \
    snprintf(n, sizeof n, "blk.%d." suffix, i);                    \
    if (load_f32(m, g, n, (ne0), (ne1), (req), &L->field)) return -1;
        T(attn_norm, "attn_norm.weight", d, 1, 1)
        T(wq, "attn_q.weight", d, qo, 1)
        T(wk, "attn_k.weight", d, kvo, 1)
        T(wv, "attn_v.weight", d, kvo, 1)
        T(wo, "attn_output.weight", qo, d, 1)
        T(ffn_norm, "ffn_norm.weight", d, 1, 1)
        T(w_gate, "ffn_gate.weight", d, f, 1)
        T(w_up, "ffn_up.weight", d, f, 1)
        T(w_down, "ffn_down.weight", f, d, 1)
        T(bq, "attn_q.bias", qo, 1, 0)
        T(bk, "attn_k.bias", kvo, 1, 0)
        T(bv, "attn_v.bias", kvo, 1, 0)
        T(bo, "attn_output.bias", d, 1, 0)
        T(b_gate, "ffn_gate.bias", f, 1, 0)
        T(b_up, "ffn_up.bias", f, 1, 0)
        T(b_down, "ffn_down.bias", d, 1, 0)
#undef T
    }
    if (load_f32(m, g, "output_norm.weight", d, 1, 1, &m->output_norm)) return -1;
    if (load_f32(m, g, "output.weight", d, V, 0, &m->output)) return -1;
    if (!m->output) m->output = m->tok_embd; /* tied embeddings, as llama.cpp does */
    if (load_f32(m, g, "rope_freqs.weight", (uint64_t)m->n_rot / 2, 1, 0, &m->rope_freqs)) return -1;
    return 0;
}

static int model_load(model_t *m, const char *path) {
    gguf_t g;
    memset(m, 0, sizeof *m);
    int rc = gguf_open(path, &g);
    if (rc == 0) rc = model_load_from(m, &g);
    gguf_free(&g);
    if (rc) {
        model_free(m);
        return -1;
    }
    m->path = xmalloc(strlen(path) + 1);
    strcpy(m->path, path);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Forward pass (float32 values; see the header comment for the float order).                        */

/* y[r, o] = sum_i x[r, i] * w[o, i] (+ b[o]) for r < n rows: w is ggml [in, out], i.e. (out, in) row-major. */
static void linear(float *y, const float *x, const float *w, const float *b, int n, int in, int out) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * in;
        for (int o = 0; o < out; o++) {
            const float *wo = w + (size_t)o * in;
            double acc = 0.0;
            for (int i = 0; i < in; i++) acc += (double)xr[i] * (double)wo[i];
            float v = (float)acc;
            y[(size_t)r * out + o] = b ? v + b[o] : v;
        }
    }
}

/* ggml_rms_norm then ggml_mul: squares in float, sum in double, scale = 1/sqrtf(mean + eps) in float. */
static void rms_norm(float *y, const float *x, const float *w, int n, int d, float eps) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * d;
        double sum = 0.0;
        for (int i = 0; i < d; i++) sum += (double)(xr[i] * xr[i]);
        const float mean = (float)(sum / d);
        const float scale = 1.0f / sqrtf(mean + eps);
        for (int i = 0; i < d; i++) y[(size_t)r * d + i] = (xr[i] * scale) * w[i];
    }
}

/* cos/sin [n, n_rot/2] as ggml_rope_cache_init with YaRN off: theta *= theta_scale per pair. */
static void rope_tables(const model_t *m, int n, float *cs, float *sn) {
    const int half = m->n_rot / 2;
    const float theta_scale = powf(m->rope_base, -2.0f / (float)m->n_rot);
    for (int p = 0; p < n; p++) {
        float theta = (float)p;
        for (int i = 0; i < half; i++) {
            const float ff = m->rope_freqs ? m->rope_freqs[i] : 1.0f;
            const float angle = m->freq_scale * (theta / ff);
            cs[(size_t)p * half + i] = (float)cos((double)angle);
            sn[(size_t)p * half + i] = (float)sin((double)angle);
            theta *= theta_scale;
        }
    }
}

/* Rotate x [n, heads, hd] in place. neox = 0: llama's adjacent pairs (2i, 2i+1); neox = 1: (i, i + half). */
static void rope_apply(float *x, int n, int heads, int hd, int n_rot, const float *cs, const float *sn, int neox) {
    const int half = n_rot / 2;
    for (int p = 0; p < n; p++) {
        for (int h = 0; h < heads; h++) {
            float *v = x + ((size_t)p * heads + h) * hd;
            for (int i = 0; i < half; i++) {
                const float c = cs[(size_t)p * half + i], s = sn[(size_t)p * half + i];
                const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
}

static int rope_is_neox(int layer) {
    return layer == 1 && strcmp(planted_bug, "rope") == 0; /* the planted bug; llama is normal mode */
}

/* Graph tensors (the `tensors` request): forward() passes each named tensor through tap(), which records a
 * copy when asked and then overwrites it with the replacement parity sent (teacher forcing). Names follow
 * llama.cpp's graph ("attn_norm-0"); rows are positions, laid out as ggml's (Q: head by head). */
#define MAX_TAPS 1024
typedef struct {
    char name[64];
    float *data; /* n * width floats, recorded */
    size_t width;
} rec_t;
typedef struct {
    int active, all;           /* all: record every tensor (names null) */
    int n;                     /* positions */
    const jval *names;         /* J_ARR of names when !all */
    const jval *replace;       /* J_ARR of {name, shape, offset, bytes} or NULL */
    const unsigned char *body; /* the request payload */
    size_t body_len;
    rec_t rec[MAX_TAPS];
    int n_rec;
    int n_replaced;
    int overflow; /* more than MAX_TAPS tensors asked for */
} taps_t;
static taps_t g_taps;

static void tap(const char *op, int layer, float *x, size_t width) {
    if (!g_taps.active) return;
    char name[64];
    if (layer >= 0) snprintf(name, sizeof name, "%s-%d", op, layer);
    else snprintf(name, sizeof name, "%s", op);
    const size_t count = (size_t)g_taps.n * width;
    int want = g_taps.all;
    for (size_t k = 0; !want && g_taps.names && k < g_taps.names->n; k++) {
        const jval *e = &g_taps.names->items[k];
        want = e->t == J_STR && strcmp(e->s, name) == 0;
    }
    if (want && g_taps.n_rec >= MAX_TAPS) g_taps.overflow = 1;
    if (want && g_taps.n_rec < MAX_TAPS) {
        rec_t *r = &g_taps.rec[g_taps.n_rec++];
        snprintf(r->name, sizeof r->name, "%s", name);
        r->width = width;
        r->data = xmalloc(count * sizeof(float));
        memcpy(r->data, x, count * sizeof(float));
    }
    for (size_t k = 0; g_taps.replace && k < g_taps.replace->n; k++) {
        const jval *e = &g_taps.replace->items[k];
        const jval *nm = jget(e, "name"), *off = jget(e, "offset"), *by = jget(e, "bytes");
        if (!nm || nm->t != J_STR || strcmp(nm->s, name) != 0) continue;
        /* checked in op_tensors: offset/bytes are integers inside the payload */
        if ((size_t)by->i != count * 4) continue; /* a wrong width is reported as not replaced */
        const unsigned char *src = g_taps.body + off->i;
        for (size_t i = 0; i < count; i++) x[i] = f32_from_bits((uint32_t)le_bytes(src + 4 * i, 4));
        g_taps.n_replaced++;
    }
}

/* logits: [n, V], or [1, V] for the last position when last_only. */
static void forward(const model_t *m, const int *tokens, int n, int last_only, float *logits) {
    const int d = m->n_embd, h = m->n_head, hk = m->n_head_kv, hd = m->head_dim, f = m->n_ff, V = m->n_vocab;
    const int qo = h * hd, kvo = hk * hd, group = h / hk, half = m->n_rot / 2;
    float *x = xmalloc((size_t)n * d * sizeof(float));
    float *t = xmalloc((size_t)n * d * sizeof(float));
    float *y = xmalloc((size_t)n * d * sizeof(float));
    float *q = xmalloc((size_t)n * qo * sizeof(float));
    float *k = xmalloc((size_t)n * kvo * sizeof(float));
    float *v = xmalloc((size_t)n * kvo * sizeof(float));
    float *att = xmalloc((size_t)n * qo * sizeof(float));
    float *gate = xmalloc((size_t)n * f * sizeof(float));
    float *up = xmalloc((size_t)n * f * sizeof(float));
    float *sc = xmalloc((size_t)n * sizeof(float));
    float *cs = xmalloc((size_t)n * half * sizeof(float) + 1);
    float *sn = xmalloc((size_t)n * half * sizeof(float) + 1);
    const float kq_scale = 1.0f / sqrtf((float)hd);

    for (int p = 0; p < n; p++) memcpy(x + (size_t)p * d, m->tok_embd + (size_t)tokens[p] * d, (size_t)d * sizeof(float));
    tap("embd", -1, x, (size_t)d); /* llama.cpp's token-embedding rows */
    rope_tables(m, n, cs, sn);
    for (int l = 0; l < m->n_layer; l++) {
        const layer_t *L = &m->layers[l];
        rms_norm(t, x, L->attn_norm, n, d, m->rms_eps);
        tap("attn_norm", l, t, (size_t)d);
        linear(q, t, L->wq, L->bq, n, d, qo);
        linear(k, t, L->wk, L->bk, n, d, kvo);
        linear(v, t, L->wv, L->bv, n, d, kvo);
        rope_apply(q, n, h, hd, m->n_rot, cs, sn, rope_is_neox(l));
        rope_apply(k, n, hk, hd, m->n_rot, cs, sn, rope_is_neox(l));
        tap("Qcur", l, q, (size_t)qo); /* after RoPE: the last node llama.cpp names Qcur */
        tap("Kcur", l, k, (size_t)kvo);
        tap("Vcur", l, v, (size_t)kvo);
        for (int hh = 0; hh < h; hh++) {
            const int g = hh / group; /* query head hh reads KV head hh / (h / hk) */
            for (int i = 0; i < n; i++) {
                const float *qi = q + ((size_t)i * h + hh) * hd;
                float mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    const float *kj = k + ((size_t)j * hk + g) * hd;
                    double acc = 0.0;
                    for (int e = 0; e < hd; e++) acc += (double)qi[e] * (double)kj[e];
                    sc[j] = (float)acc * kq_scale;
                    if (sc[j] > mx) mx = sc[j];
                }
                double sum = 0.0;
                for (int j = 0; j <= i; j++) {
                    sc[j] = expf(sc[j] - mx);
                    sum += sc[j];
                }
                const float inv = (float)(1.0 / sum);
                for (int j = 0; j <= i; j++) sc[j] *= inv;
                float *o = att + ((size_t)i * h + hh) * hd;
                for (int e = 0; e < hd; e++) {
                    double acc = 0.0;
                    for (int j = 0; j <= i; j++) acc += (double)sc[j] * (double)v[((size_t)j * hk + g) * hd + e];
                    o[e] = (float)acc;
                }
            }
        }
        tap("kqv_out", l, att, (size_t)qo);
        linear(y, att, L->wo, L->bo, n, qo, d);
        tap("attn_out", l, y, (size_t)d);
        for (size_t e = 0; e < (size_t)n * d; e++) x[e] += y[e];
        tap("ffn_inp", l, x, (size_t)d);
        rms_norm(t, x, L->ffn_norm, n, d, m->rms_eps);
        tap("ffn_norm", l, t, (size_t)d);
        linear(gate, t, L->w_gate, L->b_gate, n, d, f);
        linear(up, t, L->w_up, L->b_up, n, d, f);
        for (size_t e = 0; e < (size_t)n * f; e++) {
            const float gv = gate[e];
            gate[e] = (gv / (1.0f + expf(-gv))) * up[e];
        }
        linear(y, gate, L->w_down, L->b_down, n, f, d);
        tap("ffn_out", l, y, (size_t)d);
        for (size_t e = 0; e < (size_t)n * d; e++) x[e] += y[e];
        tap("l_out", l, x, (size_t)d);
    }
    const float *xs = last_only ? x + (size_t)(n - 1) * d : x;
    const int rows = last_only ? 1 : n;
    rms_norm(t, xs, m->output_norm, rows, d, m->rms_eps);
    if (!last_only) tap("result_norm", -1, t, (size_t)d);
    linear(logits, t, m->output, NULL, rows, d, V);
    if (!last_only) tap("result_output", -1, logits, (size_t)V);
    free(x), free(t), free(y), free(q), free(k), free(v), free(att), free(gate), free(up), free(sc), free(cs), free(sn);
}

/* ------------------------------------------------------------------------------------------------ */
/* Protocol v2.                                                                                       */

static model_t g_model;
static int g_loaded;

/* Read one line (without '\n') of any length; returns 0 at EOF with nothing read. */
static int read_line(buf_t *b) {
    b->len = 0;
    buf_put(b, "", 0);
    int c, any = 0;
    while ((c = getchar()) != EOF) {
        any = 1;
        if (c == '\n') return 1;
        char ch = (char)c;
        buf_put(b, &ch, 1);
    }
    return any;
}

static void send_reply(const buf_t *header, const unsigned char *payload, size_t payload_len) {
    fwrite(header->s, 1, header->len, stdout);
    fputc('\n', stdout);
    if (payload_len) fwrite(payload, 1, payload_len, stdout);
    fflush(stdout);
}

static void put_id(buf_t *b, const jval *id) {
    buf_puts(b, ", \"id\": ");
    if (id && id->t == J_NUM && id->is_int) buf_printf(b, "%lld", id->i);
    else if (id && id->t == J_STR) buf_json_str(b, id->s);
    else buf_puts(b, "null");
}

/* `{"ok": true|false, "id": <the request's id>` (the caller adds the rest and the closing brace). */
static void reply_start(buf_t *b, int ok, const jval *id) {
    b->len = 0;
    buf_puts(b, ok ? "{\"ok\": true" : "{\"ok\": false");
    put_id(b, id);
}

static void send_error(const jval *id, const char *op, const char *msg) {
    buf_t b = {0};
    reply_start(&b, 0, id);
    buf_puts(&b, ", \"error\": ");
    buf_json_str(&b, msg);
    buf_puts(&b, "}");
    fprintf(stderr, "c_port: %s failed: %s\n", op ? op : "request", msg);
    send_reply(&b, NULL, 0);
    free(b.s);
}

/* tokens -> ints in [0, V); *out allocated with room for `extra` more. */
static int get_tokens(const jval *req, int extra, int **out, int *n_out) {
    const jval *tv = jget(req, "tokens");
    if (!tv || tv->t != J_ARR) return fail("'tokens' must be a list of token ids");
    if (tv->n == 0) return fail("'tokens' is empty: no positions to evaluate");
    if (!g_loaded) return fail("no model loaded: send a successful hello first");
    if ((uint64_t)tv->n + (uint64_t)extra > (uint64_t)g_model.n_ctx)
        return fail("%llu positions exceed the model's training context %d", (unsigned long long)tv->n + (unsigned long long)extra,
                    g_model.n_ctx);
    int *ids = xmalloc((tv->n + (size_t)extra) * sizeof(int));
    for (size_t k = 0; k < tv->n; k++) {
        const jval *e = &tv->items[k];
        if (e->t != J_NUM || !e->is_int) {
            free(ids);
            return fail("token at position %zu is not an integer", k);
        }
        if (e->i < 0 || e->i >= g_model.n_vocab) {
            free(ids);
            return fail("token id %lld at position %zu is outside the vocabulary [0, %d)", e->i, k, g_model.n_vocab);
        }
        ids[k] = (int)e->i;
    }
    *out = ids;
    *n_out = (int)tv->n;
    return 0;
}

static void op_hello(const jval *req, const jval *id) {
    const jval *proto = jget(req, "protocol");
    const jval *model = jget(req, "model");
    const jval *options = jget(req, "options");
    if (!proto || proto->t != J_NUM || !proto->is_int || proto->i != PROTOCOL_VERSION) {
        send_error(id, "hello", "c_port speaks protocol 2 only ('protocol' must be 2)");
        return;
    }
    if (!model || model->t != J_STR || !model->s[0]) {
        send_error(id, "hello", "'model' must be the path of a GGUF file");
        return;
    }
    if (options && options->t != J_OBJ && options->t != J_NULL) {
        send_error(id, "hello", "'options' must be an object");
        return;
    }
    if (options && options->t == J_OBJ && options->n > 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "unknown option '%s' (c_port takes no options)", options->keys[0]);
        send_error(id, "hello", msg);
        return;
    }
    if (g_loaded) {
        model_free(&g_model);
        g_loaded = 0;
    }
    if (model_load(&g_model, model->s)) {
        send_error(id, "hello", g_err);
        return;
    }
    g_loaded = 1;
    fprintf(stderr, "c_port %s: loaded %s (llama, n_vocab %d, n_embd %d, n_layer %d, n_head %d/%d, n_ff %d)%s%s\n",
            C_PORT_VERSION, g_model.path, g_model.n_vocab, g_model.n_embd, g_model.n_layer, g_model.n_head,
            g_model.n_head_kv, g_model.n_ff, planted_bug[0] ? " PLANTED_BUG=" : "", planted_bug);
    buf_t b = {0};
    reply_start(&b, 1, id);
    buf_printf(&b, ", \"protocol\": %d, \"name\": \"%s\", \"version\": \"%s\", \"capabilities\": [\"greedy\", \"tensors\"]}",
               PROTOCOL_VERSION, C_PORT_NAME, C_PORT_VERSION);
    send_reply(&b, NULL, 0);
    free(b.s);
}

static void op_logits(const jval *req, const jval *id) {
    int *ids, n;
    if (get_tokens(req, 0, &ids, &n)) {
        send_error(id, "logits", g_err);
        return;
    }
    const size_t V = (size_t)g_model.n_vocab, count = (size_t)n * V;
    float *logits = xmalloc(count * sizeof(float));
    forward(&g_model, ids, n, 0, logits);
    unsigned char *payload = xmalloc(count * 4);
    for (size_t e = 0; e < count; e++) {
        uint32_t u;
        memcpy(&u, &logits[e], 4);
        payload[4 * e] = (unsigned char)u;
        payload[4 * e + 1] = (unsigned char)(u >> 8);
        payload[4 * e + 2] = (unsigned char)(u >> 16);
        payload[4 * e + 3] = (unsigned char)(u >> 24);
    }
    buf_t b = {0};
    reply_start(&b, 1, id);
    buf_printf(&b, ", \"shape\": [%d, %d], \"dtype\": \"float32\", \"payload_bytes\": %zu}", n, g_model.n_vocab, count * 4);
    send_reply(&b, payload, count * 4);
    free(b.s);
    free(payload);
    free(logits);
    free(ids);
}

static void op_greedy(const jval *req, const jval *id) {
    const jval *nv = jget(req, "n");
    if (!nv || nv->t != J_NUM || !nv->is_int || nv->i < 0 || nv->i > INT_MAX / 2) {
        send_error(id, "greedy", "'n' must be a non-negative integer");
        return;
    }
    int *ids, n, n_new = (int)nv->i;
    if (get_tokens(req, n_new, &ids, &n)) {
        send_error(id, "greedy", g_err);
        return;
    }
    float *row = xmalloc((size_t)g_model.n_vocab * sizeof(float));
    buf_t b = {0};
    reply_start(&b, 1, id);
    buf_puts(&b, ", \"tokens\": [");
    for (int s = 0; s < n_new; s++) {
        forward(&g_model, ids, n + s, 1, row);
        int best = 0; /* first maximum, as numpy's argmax */
        for (int e = 1; e < g_model.n_vocab; e++) {
            if (row[e] > row[best]) best = e;
        }
        ids[n + s] = best;
        buf_printf(&b, s ? ", %d" : "%d", best);
    }
    buf_puts(&b, "]}");
    send_reply(&b, NULL, 0);
    free(b.s);
    free(row);
    free(ids);
}

static void op_tensors(const jval *req, const jval *id, const unsigned char *body, size_t body_len) {
    const jval *names = jget(req, "names"), *replace = jget(req, "replace");
    if (names && names->t != J_ARR && names->t != J_NULL) {
        send_error(id, "tensors", "'names' must be a list of names or null");
        return;
    }
    if (replace && replace->t != J_ARR && replace->t != J_NULL) {
        send_error(id, "tensors", "'replace' must be a list");
        return;
    }
    size_t n_replace = replace && replace->t == J_ARR ? replace->n : 0;
    for (size_t k = 0; k < n_replace; k++) {
        const jval *e = &replace->items[k], *off = jget(e, "offset"), *by = jget(e, "bytes"), *nm = jget(e, "name");
        if (e->t != J_OBJ || !nm || nm->t != J_STR || !off || off->t != J_NUM || !off->is_int || !by ||
            by->t != J_NUM || !by->is_int || off->i < 0 || by->i < 0 || (uint64_t)off->i + (uint64_t)by->i > body_len) {
            send_error(id, "tensors", "a 'replace' entry needs a name and an offset/bytes inside the payload");
            return;
        }
    }
    int *ids, n;
    if (get_tokens(req, 0, &ids, &n)) {
        send_error(id, "tensors", g_err);
        return;
    }
    memset(&g_taps, 0, sizeof g_taps);
    g_taps.active = 1;
    g_taps.all = !names || names->t == J_NULL;
    g_taps.names = g_taps.all ? NULL : names;
    g_taps.replace = n_replace ? replace : NULL;
    g_taps.body = body;
    g_taps.body_len = body_len;
    g_taps.n = n;
    float *logits = xmalloc((size_t)n * g_model.n_vocab * sizeof(float));
    forward(&g_model, ids, n, 0, logits);
    g_taps.active = 0;
    if (g_taps.overflow) {
        send_error(id, "tensors", "more than 1024 tensors asked for in one request: ask for fewer names");
    } else if ((size_t)g_taps.n_replaced != n_replace) {
        send_error(id, "tensors", "a replacement names no tensor of this graph, or its width differs");
    } else {
        size_t total = 0;
        for (int r = 0; r < g_taps.n_rec; r++) total += (size_t)n * g_taps.rec[r].width * 4;
        unsigned char *payload = xmalloc(total + 1);
        buf_t b = {0};
        reply_start(&b, 1, id);
        buf_puts(&b, ", \"tensors\": [");
        size_t off = 0;
        for (int r = 0; r < g_taps.n_rec; r++) {
            const rec_t *rc = &g_taps.rec[r];
            const size_t count = (size_t)n * rc->width;
            buf_printf(&b, "%s{\"name\": ", r ? ", " : "");
            buf_json_str(&b, rc->name);
            buf_printf(&b, ", \"shape\": [%d, %zu], \"dtype\": \"float32\", \"offset\": %zu, \"bytes\": %zu}", n, rc->width,
                       off, count * 4);
            for (size_t e = 0; e < count; e++) {
                uint32_t u;
                memcpy(&u, &rc->data[e], 4);
                for (int byte = 0; byte < 4; byte++) payload[off + 4 * e + byte] = (unsigned char)(u >> (8 * byte));
            }
            off += count * 4;
        }
        buf_printf(&b, "], \"payload_bytes\": %zu}", total);
        send_reply(&b, payload, total);
        free(b.s);
        free(payload);
    }
    for (int r = 0; r < g_taps.n_rec; r++) free(g_taps.rec[r].data);
    free(logits);
    free(ids);
}

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        fprintf(stderr, "usage: %s  (speaks parity's protocol v2 on stdin/stdout; see docs/PROTOCOL.md)\n", argv[0]);
        return 0;
    }
    if (planted_bug[0] && strcmp(planted_bug, "rope") != 0) {
        fprintf(stderr, "c_port: unknown PLANTED_BUG '%s' (known: rope)\n", planted_bug);
        return 2;
    }
    buf_t line = {0};
    int said_hello = 0;
    while (read_line(&line)) {
        jval req;
        if (line.len == 0 || strspn(line.s, " \t\r") == line.len) continue; /* blank line: nothing to answer */
        if (json_parse(line.s, line.len, &req)) {
            send_error(NULL, NULL, g_err);
            continue;
        }
        const jval *id = jget(&req, "id");
        const jval *op = jget(&req, "op");
        const jval *pb = jget(&req, "payload_bytes");
        unsigned char *body = NULL; /* only a `tensors` request with replacements carries one */
        size_t body_len = 0;
        if (pb && pb->t == J_NUM && pb->is_int && pb->i > 0) {
            body = xmalloc((size_t)pb->i);
            body_len = fread(body, 1, (size_t)pb->i, stdin);
        }
        if (req.t != J_OBJ) {
            send_error(id, NULL, "a request must be a JSON object");
        } else if (!op || op->t != J_STR) {
            send_error(id, NULL, "the request has no string 'op'");
        } else if (strcmp(op->s, "hello") == 0) {
            op_hello(&req, id);
            said_hello = 1;
        } else if (strcmp(op->s, "bye") == 0) {
            buf_t b = {0};
            reply_start(&b, 1, id);
            buf_puts(&b, "}");
            send_reply(&b, NULL, 0);
            free(b.s);
            jfree(&req);
            free(body);
            break;
        } else if (!said_hello) {
            send_error(id, op->s, "hello must be the first request");
        } else if (strcmp(op->s, "logits") == 0) {
            op_logits(&req, id);
        } else if (strcmp(op->s, "greedy") == 0) {
            op_greedy(&req, id);
        } else if (strcmp(op->s, "tensors") == 0) {
            op_tensors(&req, id, body, body_len);
        } else {
            char msg[200];
            snprintf(msg, sizeof msg, "unknown op '%.100s' (c_port serves hello, logits, greedy, tensors, bye)", op->s);
            send_error(id, op->s, msg);
        }
        jfree(&req);
        free(body);
    }
    free(line.s);
    if (g_loaded) model_free(&g_model);
    return 0;
}
