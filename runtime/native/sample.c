/* Choosing the next token, exactly as the Python runtime does (runtime/sampling.py): the same
 * generator (xoshiro256** seeded by splitmix64), the same order of operations in float64, so
 * that a seeded run gives the same tokens in both runtimes. */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void rng_seed(rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double rng_uniform(rng *r) {
    uint64_t *s = r->s, out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return (double)(out >> 11) * 0x1.0p-53;
}

static _Thread_local const double *sort_keys;
/* descending by value, ties by index: numpy's stable argsort of -z */
static int descending(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (sort_keys[i] > sort_keys[j]) return -1;
    if (sort_keys[i] < sort_keys[j]) return 1;
    return (i > j) - (i < j);
}

int sample_token(const float *logits, int n, rng *r, double temperature, int top_k, double top_p,
                 double *scratch, int *order) {
    if (temperature <= 0) {  /* the first index of the largest, as numpy's argmax; the max in 8 lanes */
        float lane[8];
        int i = 0;
        for (int l = 0; l < 8; l++) lane[l] = logits[0];
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) lane[l] = logits[i + l] > lane[l] ? logits[i + l] : lane[l];
        float best = lane[0];
        for (int l = 1; l < 8; l++) best = lane[l] > best ? lane[l] : best;
        for (; i < n; i++) best = logits[i] > best ? logits[i] : best;
        for (i = 0; i < n - 1 && !(logits[i] == best); i++) {}
        return i;
    }
    double *z = scratch, *p = scratch + n, *c = scratch + 2 * (size_t)n;
    for (int i = 0; i < n; i++) {
        z[i] = (double)logits[i] / temperature;
        order[i] = i;
    }
    sort_keys = z;
    qsort(order, (size_t)n, sizeof *order, descending);
    int keep = top_k > 0 && top_k < n ? top_k : n;
    double total = 0;
    for (int i = 0; i < keep; i++) {
        p[i] = exp(z[order[i]] - z[order[0]]);
        total += p[i];
    }
    if (top_p > 0 && top_p < 1) {  /* the fewest tokens whose probability reaches top_p */
        double run = 0;
        int k = keep;
        for (int i = 0; i < keep; i++) {
            run += p[i] / total;
            if (run >= top_p) { k = i + 1; break; }
        }
        keep = k;
    }
    double run = 0;
    for (int i = 0; i < keep; i++) c[i] = run += p[i];
    double t = rng_uniform(r) * c[keep - 1];
    for (int i = 0; i < keep; i++)
        if (c[i] > t) return order[i];
    return order[keep - 1];
}
