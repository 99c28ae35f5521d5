/* A small JSON reader for manifests and safetensors headers: a tree of values over the text,
 * with strings decoded (UTF-8) and each value's source span kept, so that a manifest's
 * canonical form (sorted keys, no spaces) can be rebuilt for its checksum. */
#ifndef LLMC_JSON_H
#define LLMC_JSON_H

#include <stddef.h>
#include <stdint.h>

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

typedef struct json json;
struct json {
    enum json_type type;
    int boolean;
    int is_int;         /* a number written without fraction or exponent, within int64 */
    int64_t integer;
    double number;
    char *string;       /* decoded, NUL-terminated (strings and object keys) */
    size_t count;       /* elements of an array, members of an object */
    json *items;        /* array elements, or object member values */
    char **keys;        /* object member names */
    const char *src;    /* this value's text in the source */
    size_t src_len;
    const char *key_src; /* for an object member: its key's text in the source, with quotes */
    size_t key_len;
};

/* Parse `len` bytes; NULL on error, with a message naming the offset in `err`. */
json *json_parse(const char *text, size_t len, char *err, size_t err_len);
void json_free(json *v);

/* An object's member, or NULL. */
const json *json_get(const json *obj, const char *key);

/* The canonical text of `v` (keys sorted, no whitespace), leaving out the top-level member
 * `skip`; numbers and strings as written. Returns a malloc'ed string. */
char *json_canonical(const json *v, const char *skip, size_t *len);

#endif
