#include "json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *s, *end;
    char *err;
    size_t err_len;
    int depth;
} reader;

/* The first failure's message; json_parse adds where it happened. */
static int fail(reader *r, const char *what) {
    if (r->err && r->err_len && !r->err[0]) snprintf(r->err, r->err_len, "%s", what);
    return -1;
}

static void skip_space(reader *r) {
    while (r->s < r->end && (*r->s == ' ' || *r->s == '\n' || *r->s == '\r' || *r->s == '\t')) r->s++;
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 63)); o[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 63));
    o[2] = (char)(0x80 | ((cp >> 6) & 63)); o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* A string at r->s (the opening quote), decoded into a new buffer. */
static char *read_string(reader *r) {
    const char *p = r->s + 1;
    size_t cap = 16;
    for (const char *q = p; q < r->end && *q != '"'; q++) cap++;
    char *out = malloc(cap + 4), *o = out;
    if (!out) { fail(r, "out of memory"); return NULL; }
    while (p < r->end && *p != '"') {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20) { free(out); r->s = p; fail(r, "control character in a string"); return NULL; }
        if (c != '\\') { *o++ = (char)c; p++; continue; }
        if (p + 1 >= r->end) break;
        char e = p[1];
        p += 2;
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (p + 4 > r->end || hex4(p, &cp)) { free(out); r->s = p; fail(r, "bad \\u escape"); return NULL; }
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && p + 6 <= r->end && p[0] == '\\' && p[1] == 'u' && !hex4(p + 2, &lo)
                && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            if (cp == 0) { free(out); r->s = p; fail(r, "NUL in a string"); return NULL; }
            o += put_utf8(o, cp);
            break;
        }
        default: free(out); r->s = p; fail(r, "bad escape in a string"); return NULL;
        }
    }
    if (p >= r->end) { free(out); r->s = p; fail(r, "unterminated string"); return NULL; }
    *o = 0;
    r->s = p + 1;
    return out;
}

static int parse_value(reader *r, json *v);

static int parse_number(reader *r, json *v) {
    const char *p = r->s;
    int integral = 1;
    if (p < r->end && *p == '-') p++;
    if (p >= r->end || *p < '0' || *p > '9') return fail(r, "unexpected character");
    while (p < r->end && ((*p >= '0' && *p <= '9') || *p == '.' || *p == 'e' || *p == 'E' || *p == '+' || *p == '-')) {
        if (*p == '.' || *p == 'e' || *p == 'E') integral = 0;
        p++;
    }
    char buf[64];
    size_t n = (size_t)(p - r->s);
    if (n >= sizeof buf) return fail(r, "number too long");
    memcpy(buf, r->s, n);
    buf[n] = 0;
    char *end;
    v->type = JSON_NUMBER;
    v->number = strtod(buf, &end);
    if (end != buf + n) return fail(r, "bad number");
    if (integral) {
        errno = 0;
        long long x = strtoll(buf, &end, 10);
        v->is_int = end == buf + n && errno == 0;
        v->integer = x;
    }
    r->s = p;
    return 0;
}

static int parse_members(reader *r, json *v, int object) {
    size_t cap = 0;
    r->s++;
    skip_space(r);
    if (r->s < r->end && *r->s == (object ? '}' : ']')) { r->s++; return 0; }
    for (;;) {
        skip_space(r);
        if (v->count == cap) {
            cap = cap ? cap * 2 : 8;
            json *items = realloc(v->items, cap * sizeof *items);
            char **keys = object ? realloc(v->keys, cap * sizeof *keys) : NULL;
            if (!items || (object && !keys)) { if (items) v->items = items; if (keys) v->keys = keys; return fail(r, "out of memory"); }
            v->items = items;
            if (object) v->keys = keys;
        }
        json *item = &v->items[v->count];
        memset(item, 0, sizeof *item);
        if (object) {
            if (r->s >= r->end || *r->s != '"') return fail(r, "expected a member name");
            const char *k = r->s;
            v->keys[v->count] = read_string(r);
            if (!v->keys[v->count]) return -1;
            item->key_src = k;
            item->key_len = (size_t)(r->s - k);
            v->count++;
            skip_space(r);
            if (r->s >= r->end || *r->s != ':') return fail(r, "expected ':'");
            r->s++;
            skip_space(r);
        } else {
            v->count++;
        }
        if (parse_value(r, item)) return -1;
        skip_space(r);
        if (r->s < r->end && *r->s == ',') { r->s++; continue; }
        if (r->s < r->end && *r->s == (object ? '}' : ']')) { r->s++; return 0; }
        return fail(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int parse_value(reader *r, json *v) {
    skip_space(r);
    if (r->s >= r->end) return fail(r, "unexpected end");
    if (++r->depth > 64) return fail(r, "nested too deeply");
    const char *start = r->s;
    int rc = 0;
    char c = *r->s;
    if (c == '{' || c == '[') {
        v->type = c == '{' ? JSON_OBJECT : JSON_ARRAY;
        rc = parse_members(r, v, c == '{');
    } else if (c == '"') {
        v->type = JSON_STRING;
        v->string = read_string(r);
        rc = v->string ? 0 : -1;
    } else if (r->end - r->s >= 4 && !memcmp(r->s, "null", 4)) {
        v->type = JSON_NULL; r->s += 4;
    } else if (r->end - r->s >= 4 && !memcmp(r->s, "true", 4)) {
        v->type = JSON_BOOL; v->boolean = 1; r->s += 4;
    } else if (r->end - r->s >= 5 && !memcmp(r->s, "false", 5)) {
        v->type = JSON_BOOL; r->s += 5;
    } else {
        rc = parse_number(r, v);
    }
    r->depth--;
    v->src = start;
    v->src_len = (size_t)(r->s - start);
    return rc;
}

static void free_members(json *v) {
    for (size_t i = 0; i < v->count; i++) {
        free_members(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->string);
}

void json_free(json *v) {
    if (!v) return;
    free_members(v);
    free(v);
}

json *json_parse(const char *text, size_t len, char *err, size_t err_len) {
    reader r = {text, text + len, err, err_len, 0};
    if (err && err_len) err[0] = 0;
    json *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    if (parse_value(&r, v) == 0) {
        skip_space(&r);
        if (r.s == r.end) return v;
        fail(&r, "text after the value");
    }
    if (err && err_len) {
        char what[128];
        snprintf(what, sizeof what, "%s", err);
        snprintf(err, err_len, "%s at byte %zu", what, (size_t)(r.s - text));
    }
    json_free(v);
    return NULL;
}

const json *json_get(const json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->count; i++)
        if (!strcmp(obj->keys[i], key)) return &obj->items[i];
    return NULL;
}

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} out_buf;

static void put(out_buf *o, const char *s, size_t n) {
    if (o->oom) return;
    if (o->len + n + 1 > o->cap) {
        size_t cap = (o->cap ? o->cap * 2 : 4096) + n;
        char *b = realloc(o->buf, cap);
        if (!b) { o->oom = 1; return; }
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    o->buf[o->len] = 0;
}

static const json *sort_base;
static int by_key(const void *a, const void *b) {
    return strcmp(sort_base->keys[*(const size_t *)a], sort_base->keys[*(const size_t *)b]);
}

static void canonical(out_buf *o, const json *v, const char *skip) {
    if (v->type == JSON_ARRAY) {
        put(o, "[", 1);
        for (size_t i = 0; i < v->count; i++) {
            if (i) put(o, ",", 1);
            canonical(o, &v->items[i], NULL);
        }
        put(o, "]", 1);
    } else if (v->type == JSON_OBJECT) {
        /* UTF-8 byte order is code point order: the order Python's sort_keys gives */
        size_t *order = malloc((v->count + 1) * sizeof *order);
        if (!order) { o->oom = 1; return; }
        for (size_t i = 0; i < v->count; i++) order[i] = i;
        sort_base = v;
        qsort(order, v->count, sizeof *order, by_key);
        put(o, "{", 1);
        int first = 1;
        for (size_t j = 0; j < v->count; j++) {
            size_t i = order[j];
            if (skip && !strcmp(v->keys[i], skip)) continue;
            if (!first) put(o, ",", 1);
            first = 0;
            put(o, v->items[i].key_src, v->items[i].key_len);
            put(o, ":", 1);
            canonical(o, &v->items[i], NULL);
        }
        put(o, "}", 1);
        free(order);
    } else {
        put(o, v->src, v->src_len);
    }
}

char *json_canonical(const json *v, const char *skip, size_t *len) {
    out_buf o = {0};
    canonical(&o, v, skip);
    if (o.oom) { free(o.buf); return NULL; }
    if (len) *len = o.len;
    return o.buf;
}
