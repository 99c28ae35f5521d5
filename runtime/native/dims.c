/* Plan dims, as the Python runtime reads them (runtime/dims.py): an atom is a run-time dim or
 * an expression over them with integers, + - * // and min/max, parsed here (never evaluated as
 * code). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { OP_NUM, OP_DIM, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MIN, OP_MAX };
static const char *NAMES[N_RUNTIME_DIMS] = {"batch", "seq", "past", "total", "blocks"};

typedef struct {
    const char *text, *p;
    dim_atoms *t;
    int bad;
} parser;

static int node(parser *ps, int op, int64_t value, int a, int b) {
    dim_atoms *t = ps->t;
    if (t->n_nodes == t->cap_nodes) {
        int cap = t->cap_nodes ? t->cap_nodes * 2 : 64;
        dim_node *n = realloc(t->nodes, (size_t)cap * sizeof *n);
        if (!n) { ps->bad = 1; return 0; }
        t->nodes = n;
        t->cap_nodes = cap;
    }
    t->nodes[t->n_nodes] = (dim_node){op, value, a, b};
    return t->n_nodes++;
}

static void space(parser *ps) { while (*ps->p == ' ') ps->p++; }

static int accept(parser *ps, const char *tok) {
    space(ps);
    size_t n = strlen(tok);
    if (strncmp(ps->p, tok, n)) return 0;
    ps->p += n;
    return 1;
}

static int expect(parser *ps, const char *tok) {
    if (!accept(ps, tok)) ps->bad = 1;
    return !ps->bad;
}

static int sum(parser *ps);

static int atom(parser *ps) {
    space(ps);
    if (ps->bad) return 0;
    if (accept(ps, "-")) return node(ps, OP_SUB, 0, node(ps, OP_NUM, 0, 0, 0), atom(ps));
    if (accept(ps, "(")) {
        int v = sum(ps);
        expect(ps, ")");
        return v;
    }
    if (*ps->p >= '0' && *ps->p <= '9') {
        int64_t v = 0;
        while (*ps->p >= '0' && *ps->p <= '9') {
            if (v > (INT64_MAX - 9) / 10) { ps->bad = 1; return 0; }
            v = v * 10 + (*ps->p++ - '0');
        }
        return node(ps, OP_NUM, v, 0, 0);
    }
    const char *s = ps->p;
    while ((*ps->p >= 'a' && *ps->p <= 'z') || (*ps->p >= 'A' && *ps->p <= 'Z') || *ps->p == '_'
           || (ps->p > s && *ps->p >= '0' && *ps->p <= '9'))
        ps->p++;
    size_t n = (size_t)(ps->p - s);
    if (n == 3 && (!strncmp(s, "min", 3) || !strncmp(s, "max", 3))) {
        int op = s[1] == 'i' ? OP_MIN : OP_MAX;
        expect(ps, "(");
        int a = sum(ps);
        expect(ps, ",");
        int b = sum(ps);
        expect(ps, ")");
        return node(ps, op, 0, a, b);
    }
    for (int d = 0; d < N_RUNTIME_DIMS; d++)
        if (n == strlen(NAMES[d]) && !strncmp(s, NAMES[d], n)) return node(ps, OP_DIM, d, 0, 0);
    ps->bad = 1;
    return 0;
}

/* operand (op operand)*, left-associative; the two operators are tried in order (// before *) */
static int chain(parser *ps, int (*operand)(parser *), const char *first, int first_op, const char *second,
                 int second_op) {
    int left = operand(ps);
    for (;;) {
        if (accept(ps, first)) left = node(ps, first_op, 0, left, operand(ps));
        else if (accept(ps, second)) left = node(ps, second_op, 0, left, operand(ps));
        else return left;
    }
}

static int product(parser *ps) { return chain(ps, atom, "//", OP_DIV, "*", OP_MUL); }

static int sum(parser *ps) { return chain(ps, product, "+", OP_ADD, "-", OP_SUB); }

int dims_atom(dim_atoms *t, const char *text) {
    for (int i = 0; i < t->n_atoms; i++)
        if (!strcmp(t->texts[i], text)) return i;
    parser ps = {text, text, t, 0};
    int root = sum(&ps);
    space(&ps);
    if (ps.bad || *ps.p) {
        set_error("dim expression '%s' is not an expression over batch, seq, past and total", text);
        return -1;
    }
    if (t->n_atoms == t->cap_atoms) {
        int cap = t->cap_atoms ? t->cap_atoms * 2 : 16;
        char **texts = realloc(t->texts, (size_t)cap * sizeof *texts);
        if (texts) t->texts = texts;
        int *roots = realloc(t->roots, (size_t)cap * sizeof *roots);
        if (roots) t->roots = roots;
        if (!texts || !roots) { set_error("out of memory"); return -1; }
        t->cap_atoms = cap;
    }
    t->texts[t->n_atoms] = strdup(text);
    t->roots[t->n_atoms] = root;
    return t->n_atoms++;
}

static int64_t floordiv(int64_t a, int64_t b) {
    if (b == 0) return 0;  /* the compiler never writes one; no trap on a crafted manifest */
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static int64_t eval(const dim_atoms *t, int i, const int64_t *env) {
    const dim_node *n = &t->nodes[i];
    switch (n->op) {
    case OP_NUM: return n->value;
    case OP_DIM: return env[n->value];
    }
    int64_t a = eval(t, n->a, env), b = eval(t, n->b, env);
    switch (n->op) {
    case OP_ADD: return a + b;
    case OP_SUB: return a - b;
    case OP_MUL: return a * b;
    case OP_DIV: return floordiv(a, b);
    case OP_MIN: return a < b ? a : b;
    default: return a > b ? a : b;
    }
}

void dims_eval_atoms(const dim_atoms *t, const int64_t env[N_RUNTIME_DIMS], int64_t *values) {
    for (int i = 0; i < t->n_atoms; i++) values[i] = eval(t, t->roots[i], env);
}

int dims_read(dim_atoms *t, const json *j, dim *out, const char *where) {
    memset(out, 0, sizeof *out);
    if (j->type == JSON_NUMBER && j->is_int && j->integer >= 0) {
        out->constant = j->integer;
        return 0;
    }
    if (j->type != JSON_ARRAY) goto bad;
    out->terms = calloc(j->count + 1, sizeof *out->terms);
    if (!out->terms) { set_error("out of memory"); return -1; }
    for (size_t i = 0; i < j->count; i++) {
        const json *term = &j->items[i];
        if (term->type != JSON_ARRAY || term->count != 2 || term->items[0].type != JSON_NUMBER
            || !term->items[0].is_int || term->items[1].type != JSON_ARRAY || term->items[1].count > 4)
            goto bad;
        dim_term *d = &out->terms[out->n_terms++];
        d->coeff = term->items[0].integer;
        for (size_t k = 0; k < term->items[1].count; k++) {
            const json *a = &term->items[1].items[k];
            if (a->type != JSON_STRING) goto bad;
            int id = dims_atom(t, a->string);
            if (id < 0) {
                char why[256];
                strncpy(why, get_error(), sizeof why - 1);
                why[sizeof why - 1] = 0;
                set_error("%s: %s", where, why);
                return -1;
            }
            d->atoms[d->n++] = id;
        }
    }
    return 0;
bad:
    set_error("%s: expected a dim (an integer, or [[coefficient, [atoms]], ...])", where);
    return -1;
}

int64_t dims_value(const dim *d, const int64_t *atom_values) {
    int64_t total = d->constant;
    for (int i = 0; i < d->n_terms; i++) {
        int64_t term = d->terms[i].coeff;
        for (int k = 0; k < d->terms[i].n; k++) term *= atom_values[d->terms[i].atoms[k]];
        total += term;
    }
    return total;
}

void dims_free(dim_atoms *t) {
    for (int i = 0; i < t->n_atoms; i++) free(t->texts[i]);
    free(t->texts);
    free(t->roots);
    free(t->nodes);
    memset(t, 0, sizeof *t);
}
