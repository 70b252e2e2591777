/*
 * dpsn._native: fused CPU loops for the row path's hot spots.
 *
 * Why C: on the CPU each PyTorch op costs a few microseconds of dispatch whatever its size,
 * and the row path's work comes in many small ops (a hash probe is ~10 of them) or in many
 * passes over the same rows (gather, compute, scatter, optimizer, re-materialize). Each
 * function here does one such job in one pass, with the GIL released. Nothing here allocates
 * or owns memory: the Python wrappers (dpsn/kernels.py) check every tensor (CPU, contiguous,
 * dtype, shape) and pass raw pointers; the loops still check every index they follow, since a
 * bad index would corrupt memory rather than raise.
 *
 * Plain C with no PyTorch headers, so it builds at `pip install` time with only a C compiler
 * and the Python headers; without a compiler the package installs anyway (an optional
 * extension) and every caller falls back to its PyTorch path, which CI also tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATHS 1
#endif

/* Hot loops are compiled twice, for x86-64-v3 (AVX2, FMA) and for the baseline, and the loader picks
 * what the CPU has (GCC function multi-versioning). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

#define ACT_GELU 0
#define ACT_RELU 1
#define ACT_SILU 2
#define ACT_TANH 3

/* ---------------------------------------------------------------------------------------- */
/* cuckoo lookup (tiers/_slot_table.py)                                                      */
/*                                                                                            */
/* The table's arguments come first in every cuckoo call, in this order: entries (int32 or   */
/* int64 [2 * half]), wide (entries are int64), half (= 2^bits), bits, mult0, mult1,          */
/* capacity, slot_ids (int64 [capacity + 1]; -1 where empty, and the last one, the sentinel   */
/* slot that empty entries name, always -1). parse_table reads and checks them once.         */

typedef struct {
    const int32_t *e32;
    const int64_t *e64;
    int wide;
    int bits;
    long long half, mult0, mult1, capacity;
    const int64_t *slot_ids;
} cuckoo_table;

/* "K i L i L L L K": the table's arguments as the format of PyArg_ParseTuple spells them */
#define TABLE_FMT "KiLiLLLK"

/* Checks what the loops rely on: 1 <= bits <= 62, half == 2^bits, capacity >= 1, and that an
 * int32 table can name every slot. The pointers' extents are checked by the Python wrapper
 * (dpsn/_kernels.py _table_args); every entry read is still checked against the capacity. */
static int table_ok(const cuckoo_table *t, const char *who) {
    if (t->bits < 1 || t->bits > 62 || t->half != (1LL << t->bits) || t->capacity < 1 ||
        (!t->wide && t->capacity > INT32_MAX) || (t->wide != 0 && t->wide != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: bad hash-table parameters", who);
        return 0;
    }
    return 1;
}

static inline int64_t place(int64_t id, int64_t mult, int bits) {
    /* the top `bits` bits of the wrapped product, as the PyTorch path computes them */
    uint64_t h = (uint64_t)id * (uint64_t)mult;
    return (int64_t)(h >> (64 - bits));
}

/* Entry `at` of the table: the slot it names (capacity: none, the sentinel). */
static inline int64_t entry_at(const cuckoo_table *t, int64_t at) {
    return t->wide ? t->e64[at] : (int64_t)t->e32[at];
}

static inline void prefetch_entry(const cuckoo_table *t, int64_t id) {
    const int64_t at = place(id, t->mult0, t->bits);
    __builtin_prefetch(t->wide ? (const void *)(t->e64 + at) : (const void *)(t->e32 + at));
}

#define PROBE_BAD (-2) /* an entry names no slot (the table is corrupt) */
#define PROBE_MISS (-1)

/* The one lookup every cuckoo loop uses: the slot holding `id`, PROBE_MISS if no slot does,
 * PROBE_BAD for an entry out of range. `*seen` gets the last slot probed, clamped into the
 * cache (what find reports for a miss). A slot answers only if it is a real one (< capacity)
 * and holds `id` now; a negative id (index.PAD_ID is -1) is never cached, so it never matches
 * an empty slot's -1, nor the sentinel's. */
static inline int64_t probe(const cuckoo_table *t, int64_t id, int64_t *seen) {
    int64_t s = entry_at(t, place(id, t->mult0, t->bits));
    if (s < 0 || s > t->capacity) return PROBE_BAD;
    if (id >= 0 && s < t->capacity && t->slot_ids[s] == id) {
        *seen = s;
        return s;
    }
    s = entry_at(t, place(id, t->mult1, t->bits) + t->half);
    if (s < 0 || s > t->capacity) return PROBE_BAD;
    *seen = s < t->capacity ? s : t->capacity - 1;
    return id >= 0 && s < t->capacity && t->slot_ids[s] == id ? s : PROBE_MISS;
}

static PyObject *cuckoo_find(PyObject *self, PyObject *args) {
    unsigned long long entries_p, slot_ids_p, ids_p, out_slots_p, out_hit_p;
    long long n;
    cuckoo_table t;
    if (!PyArg_ParseTuple(args, TABLE_FMT "KLKK", &entries_p, &t.wide, &t.half, &t.bits,
                          &t.mult0, &t.mult1, &t.capacity, &slot_ids_p, &ids_p, &n,
                          &out_slots_p, &out_hit_p) ||
        !table_ok(&t, "cuckoo_find")) {
        return NULL;
    }
    t.e32 = (const int32_t *)entries_p;
    t.e64 = (const int64_t *)entries_p;
    t.slot_ids = (const int64_t *)slot_ids_p;
    const int64_t *ids = (const int64_t *)ids_p;
    int64_t *out_slots = (int64_t *)out_slots_p;
    uint8_t *out_hit = (uint8_t *)out_hit_p;
    long long hits = 0, bad = 0;
    const long long ahead = 8;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        if (i + ahead < n) prefetch_entry(&t, ids[i + ahead]); /* overlap the cache misses */
        int64_t seen = 0;
        const int64_t s = probe(&t, ids[i], &seen);
        if (s == PROBE_BAD) { bad = 1; break; }
        out_hit[i] = s >= 0;
        out_slots[i] = seen;
        hits += s >= 0;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "cuckoo_find: a table entry names no slot");
        return NULL;
    }
    return PyLong_FromLongLong(hits);
}

/* Cuckoo insertion (tiers/_slot_table.py SlotTable.insert) of unique `ids`, absent from the
 * table, whose rows now live in `slots`, one id after another: a free first place, else a free
 * second place, else the first place, whose live row moves to its own other place, and so on.
 * An entry is live while `home[slot]` points back at it (see the module docstring there).
 * Returns how many ids were inserted; fewer than n when a chain of moves ran past `max_kicks`
 * (the table is then inconsistent and the caller rebuilds it); raises for a negative id, or a
 * slot or entry out of range.
 *
 * Why: the vectorized PyTorch insertion is ~20 tensor ops a round and cost ~6 ms for a cold
 * fill of 32k rows, about as much as generating them; here the work is one probe per id. */
static PyObject *cuckoo_insert(PyObject *self, PyObject *args) {
    unsigned long long entries_p, slot_ids_p, home_p, ids_p, slots_p;
    long long n, max_kicks;
    cuckoo_table t;
    if (!PyArg_ParseTuple(args, TABLE_FMT "KKKLL", &entries_p, &t.wide, &t.half, &t.bits,
                          &t.mult0, &t.mult1, &t.capacity, &slot_ids_p, &home_p, &ids_p,
                          &slots_p, &n, &max_kicks) ||
        !table_ok(&t, "cuckoo_insert")) {
        return NULL;
    }
    int32_t *e32 = (int32_t *)entries_p;
    int64_t *e64 = (int64_t *)entries_p;
    t.e32 = e32;
    t.e64 = e64;
    t.slot_ids = (const int64_t *)slot_ids_p;
    const long long capacity = t.capacity, half = t.half;
    int64_t *home = (int64_t *)home_p;
    const int64_t *ids = (const int64_t *)ids_p;
    const int64_t *slots = (const int64_t *)slots_p;
    long long done = 0;
    int bad = 0;
    const long long ahead = 8;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n && !bad; i++) {
        if (i + ahead < n) prefetch_entry(&t, ids[i + ahead]);
        int64_t cur = slots[i];
        if (cur < 0 || cur >= capacity || ids[i] < 0) { bad = 1; break; }
        int64_t at = place(ids[i], t.mult0, t.bits);
        int64_t held = entry_at(&t, at);
        if (held < 0 || held > capacity) { bad = 1; break; }
        if (home[held] == at) { /* first place taken: the second, if it is free */
            const int64_t at2 = place(ids[i], t.mult1, t.bits) + half;
            const int64_t held2 = entry_at(&t, at2);
            if (held2 < 0 || held2 > capacity) { bad = 1; break; }
            if (home[held2] != at2) { at = at2; held = held2; }
        }
        long long kicks = 0;
        for (;;) {
            const int live = home[held] == at;
            if (t.wide) e64[at] = cur; else e32[at] = (int32_t)cur;
            home[cur] = at;
            if (!live) break;
            if (held >= capacity) { bad = 1; break; } /* the sentinel slot is never live */
            if (++kicks > max_kicks) break;
            /* the row that lived here moves to its other place */
            cur = held;
            const int64_t id = t.slot_ids[cur];
            at = at >= half ? place(id, t.mult0, t.bits) : place(id, t.mult1, t.bits) + half;
            held = entry_at(&t, at);
            if (held < 0 || held > capacity) { bad = 1; break; }
        }
        if (kicks > max_kicks) break;
        done++;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError,
                        "cuckoo_insert: a negative id, or a table entry or slot out of range");
        return NULL;
    }
    return PyLong_FromLongLong(done);
}

/* ---------------------------------------------------------------------------------------- */
/* Grouping a batch's ids (tiers/_stack.py RowStack.page_in): the distinct ids in ascending     */
/* order, how often each occurs, where each use's id went, and the uses ordered by id.         */

#define RADIX_BITS 11
#define RADIX_SIZE (1 << RADIX_BITS)

/* ids [n] (each >= 0) -> order [n] (a stable sort of the uses by id), uniq [<= n], counts,
 * inverse [n] (uniq[inverse[i]] == ids[i]); returns the number of distinct ids, -1 for a
 * negative id. `keys`/`tmp_keys`/`tmp_order` are scratch of n each.
 *
 * Why: torch.sort of a step's 16k ids plus unique_consecutive, repeat_interleave and a scatter
 * took ~1.3 ms of a ~2.8 ms page-in; an LSD radix sort does as many 11-bit passes as the largest
 * id needs (2 for 32,000 rows, 4 for 10**12), each two linear sweeps. */
static long long group_ids_impl(const int64_t *ids, long long n, int64_t *order, int64_t *uniq,
                                int64_t *counts, int64_t *inverse, int64_t *keys,
                                int64_t *tmp_keys, int64_t *tmp_order) {
    int64_t max = 0;
    for (long long i = 0; i < n; i++) {
        if (ids[i] < 0) return -1;
        if (ids[i] > max) max = ids[i];
        keys[i] = ids[i];
        order[i] = i;
    }
    int bits = 0;
    while (bits < 63 && (max >> bits) != 0) bits++;
    long long hist[RADIX_SIZE];
    for (int shift = 0; shift < bits; shift += RADIX_BITS) {
        memset(hist, 0, sizeof(hist));
        for (long long i = 0; i < n; i++) hist[(keys[i] >> shift) & (RADIX_SIZE - 1)]++;
        long long sum = 0;
        for (int b = 0; b < RADIX_SIZE; b++) {
            const long long c = hist[b];
            hist[b] = sum;
            sum += c;
        }
        for (long long i = 0; i < n; i++) {
            const long long at = hist[(keys[i] >> shift) & (RADIX_SIZE - 1)]++;
            tmp_keys[at] = keys[i];
            tmp_order[at] = order[i];
        }
        memcpy(keys, tmp_keys, sizeof(int64_t) * n);
        memcpy(order, tmp_order, sizeof(int64_t) * n);
    }
    long long m = -1;
    for (long long i = 0; i < n; i++) {
        if (i == 0 || keys[i] != keys[i - 1]) {
            uniq[++m] = keys[i];
            counts[m] = 0;
        }
        counts[m]++;
        inverse[order[i]] = m;
    }
    return m + 1;
}

static PyObject *group_ids(PyObject *self, PyObject *args) {
    unsigned long long ids_p, order_p, uniq_p, counts_p, inverse_p, s1_p, s2_p, s3_p;
    long long n;
    if (!PyArg_ParseTuple(args, "KLKKKKKKK", &ids_p, &n, &order_p, &uniq_p, &counts_p,
                          &inverse_p, &s1_p, &s2_p, &s3_p)) {
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "group_ids: a negative size");
        return NULL;
    }
    long long m;
    Py_BEGIN_ALLOW_THREADS
    m = group_ids_impl((const int64_t *)ids_p, n, (int64_t *)order_p, (int64_t *)uniq_p,
                       (int64_t *)counts_p, (int64_t *)inverse_p, (int64_t *)s1_p,
                       (int64_t *)s2_p, (int64_t *)s3_p);
    Py_END_ALLOW_THREADS
    if (m < 0) {
        PyErr_SetString(PyExc_ValueError, "group_ids: a negative id");
        return NULL;
    }
    return PyLong_FromLongLong(m);
}

/* A hot read: find every id's slot (probe) and, if all are cached, copy their rows (`width`
 * bytes each) into `out` and, given `last` (an LRU policy's float64 column), stamp each slot
 * with `step`. Returns 1 as soon as an id is not found (nothing is gathered then, and the slots
 * are partial: a read with a miss takes the lookup path, so a cold read pays one probe here,
 * not a pass over the batch), else 0. The table entry of an id a few ahead is prefetched: the
 * probes are independent cache misses, so they can overlap. Only slots below the capacity
 * are ever gathered or stamped (probe answers no others). */
static PyObject *find_gather(PyObject *self, PyObject *args) {
    unsigned long long entries_p, slot_ids_p, ids_p, out_slots_p, table_p, out_p, last_p;
    long long n, width;
    double step;
    cuckoo_table t;
    if (!PyArg_ParseTuple(args, TABLE_FMT "KLKKLKKd", &entries_p, &t.wide, &t.half, &t.bits,
                          &t.mult0, &t.mult1, &t.capacity, &slot_ids_p, &ids_p, &n,
                          &out_slots_p, &table_p, &width, &out_p, &last_p, &step) ||
        !table_ok(&t, "find_gather")) {
        return NULL;
    }
    if (width < 0) {
        PyErr_SetString(PyExc_ValueError, "find_gather: a negative row width");
        return NULL;
    }
    t.e32 = (const int32_t *)entries_p;
    t.e64 = (const int64_t *)entries_p;
    t.slot_ids = (const int64_t *)slot_ids_p;
    const int64_t *ids = (const int64_t *)ids_p;
    int64_t *out_slots = (int64_t *)out_slots_p;
    const char *table = (const char *)table_p;
    char *out = (char *)out_p;
    double *last = (double *)last_p;
    long long misses = 0, bad = 0;
    const long long ahead = 8;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        if (i + ahead < n) prefetch_entry(&t, ids[i + ahead]);
        int64_t seen = 0;
        const int64_t s = probe(&t, ids[i], &seen);
        if (s == PROBE_BAD) { bad = 1; break; }
        if (s == PROBE_MISS) { misses = 1; break; } /* a miss: the caller looks up */
        out_slots[i] = s;
    }
    if (!bad && misses == 0) {
        for (long long i = 0; i < n; i++) {
            if (i + 4 < n) __builtin_prefetch(table + out_slots[i + 4] * width);
            memcpy(out + i * width, table + out_slots[i] * width, (size_t)width);
            if (last) last[out_slots[i]] = step;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "find_gather: a table entry names no slot");
        return NULL;
    }
    return PyLong_FromLongLong(misses);
}

/* ---------------------------------------------------------------------------------------- */
/* activations: value and derivative, as torch computes them in float32                      */

static inline float act_value(int kind, float h) {
    switch (kind) {
    case ACT_GELU: return 0.5f * h * (1.0f + erff(h * (float)M_SQRT1_2));
    case ACT_RELU: return h > 0.0f ? h : 0.0f;
    case ACT_SILU: return h / (1.0f + expf(-h));
    default: return tanhf(h);
    }
}

static inline float act_grad(int kind, float h) {
    switch (kind) {
    case ACT_GELU: {
        const float cdf = 0.5f * (1.0f + erff(h * (float)M_SQRT1_2));
        const float pdf = expf(-0.5f * h * h) * 0.3989422804014327f; /* 1/sqrt(2 pi) */
        return cdf + h * pdf;
    }
    case ACT_RELU: return h > 0.0f ? 1.0f : 0.0f;
    case ACT_SILU: {
        const float s = 1.0f / (1.0f + expf(-h));
        return s * (1.0f + h * (1.0f - s));
    }
    default: {
        const float t = tanhf(h);
        return 1.0f - t * t;
    }
    }
}

/* Eight running sums, so the compiler may keep them in one vector register (a single sum
 * is a chain of dependent adds it must not reorder); the order is fixed, so the result is
 * the same bits on every call. */
static inline float dot(const float *a, const float *b, long long n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    long long j = 0;
    for (; j + 8 <= n; j += 8) {
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    }
    float tail = 0.0f;
    for (; j < n; j++) tail += a[j] * b[j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) +
           tail;
}

static inline void axpy(float *y, float a, const float *x, long long n) {
    for (long long j = 0; j < n; j++) y[j] += a * x[j];
}

/* ---------------------------------------------------------------------------------------- */
/* PEER executor (pool/_layer.py). Use u (of M) reads row index[i] of the table (u | v) for
 * token token[u] with gate gates[u]:  y[t] = sum_{u of t} gates[u] act(x[t] . u) v.
 * The loops walk the uses row by row (CSR: row i's uses are order[offsets[i]:offsets[i+1]]),
 * so each distinct row is read from the big table once, and only the small per-token arrays
 * (x, y, dy, dx: a few hundred KiB, cache-resident) are touched per use. */

static inline void prefetch_row(const float *row, long long dim) {
    for (long long j = 0; j < dim; j += 16) __builtin_prefetch(row + j);
}

static inline int csr_ok(const int64_t *offsets, long long n, long long M) {
    return offsets[0] == 0 && offsets[n] == M;
}

/* The sizes and scalars the PEER loops rely on (the wrapper checks the arrays' extents). */
static int peer_ok(const char *who, long long rows, long long dim, long long d_in, long long T,
                   long long M, long long n, int kind) {
    if (rows < 0 || dim < 1 || d_in < 0 || d_in > dim || T < 0 || M < 0 || n < 0 ||
        kind < ACT_GELU || kind > ACT_TANH) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes or activation kind", who);
        return 0;
    }
    return 1;
}

HOT static PyObject *peer_forward(PyObject *self, PyObject *args) {
    unsigned long long table_p, index_p, off_p, order_p, token_p, x_p, gates_p, y_p, h_p;
    long long rows, dim, d_in, T, M, n;
    int kind;
    if (!PyArg_ParseTuple(args, "KLLLKKKKKKLLLiKK", &table_p, &rows, &dim, &d_in, &index_p,
                          &off_p, &order_p, &token_p, &x_p, &gates_p, &T, &M, &n, &kind, &y_p,
                          &h_p) ||
        !peer_ok("peer_forward", rows, dim, d_in, T, M, n, kind)) {
        return NULL;
    }
    const float *table = (const float *)table_p;
    const int64_t *index = (const int64_t *)index_p, *off = (const int64_t *)off_p;
    const int64_t *order = (const int64_t *)order_p, *token = (const int64_t *)token_p;
    const float *x = (const float *)x_p, *gates = (const float *)gates_p;
    float *y = (float *)y_p, *h = (float *)h_p;
    const long long d_out = dim - d_in;
    long long bad = !csr_ok(off, n, M);
    Py_BEGIN_ALLOW_THREADS
    memset(y, 0, sizeof(float) * T * d_out);
    for (long long i = 0; i < n && !bad; i++) {
        const int64_t s = index[i];
        if (s < 0 || s >= rows || off[i + 1] < off[i] || off[i + 1] > M) { bad = 1; break; }
        if (i + 1 < n && index[i + 1] >= 0 && index[i + 1] < rows) {
            prefetch_row(table + index[i + 1] * dim, dim);
        }
        const float *row = table + s * dim, *v = row + d_in;
        for (int64_t p = off[i]; p < off[i + 1]; p++) {
            const int64_t u = order[p];
            if (u < 0 || u >= M) { bad = 1; break; }
            const int64_t t = token[u];
            if (t < 0 || t >= T) { bad = 1; break; }
            const float hu = dot(x + t * d_in, row, d_in);
            h[u] = hu;
            const float w = gates[u] * act_value(kind, hu);
            if (w != 0.0f) axpy(y + t * d_out, w, v, d_out);
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "peer_forward: an index is out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Backward: dx [T, d_in], dgates [M], and each distinct row's summed gradient [n, dim] (its
 * uses summed in CSR order, so every path that calls this gets the same bits). */
HOT static PyObject *peer_backward(PyObject *self, PyObject *args) {
    unsigned long long table_p, index_p, off_p, order_p, token_p, x_p, gates_p, h_p, dy_p;
    unsigned long long dx_p, dg_p, rg_p;
    long long rows, dim, d_in, T, M, n;
    int kind;
    if (!PyArg_ParseTuple(args, "KLLLKKKKKKKKLLLiKKK", &table_p, &rows, &dim, &d_in, &index_p,
                          &off_p, &order_p, &token_p, &x_p, &gates_p, &h_p, &dy_p, &T, &M, &n,
                          &kind, &dx_p, &dg_p, &rg_p) ||
        !peer_ok("peer_backward", rows, dim, d_in, T, M, n, kind)) {
        return NULL;
    }
    const float *table = (const float *)table_p;
    const int64_t *index = (const int64_t *)index_p, *off = (const int64_t *)off_p;
    const int64_t *order = (const int64_t *)order_p, *token = (const int64_t *)token_p;
    const float *x = (const float *)x_p, *gates = (const float *)gates_p;
    const float *h = (const float *)h_p, *dy = (const float *)dy_p;
    float *dx = (float *)dx_p, *dgates = (float *)dg_p, *rowgrad = (float *)rg_p;
    const long long d_out = dim - d_in;
    long long bad = !csr_ok(off, n, M);
    Py_BEGIN_ALLOW_THREADS
    memset(dx, 0, sizeof(float) * T * d_in);
    for (long long i = 0; i < n && !bad; i++) {
        const int64_t s = index[i];
        if (s < 0 || s >= rows || off[i + 1] < off[i] || off[i + 1] > M) { bad = 1; break; }
        if (i + 1 < n && index[i + 1] >= 0 && index[i + 1] < rows) {
            prefetch_row(table + index[i + 1] * dim, dim);
        }
        const float *row = table + s * dim, *v = row + d_in;
        float *gr = rowgrad + i * dim;
        memset(gr, 0, sizeof(float) * dim);
        for (int64_t p = off[i]; p < off[i + 1]; p++) {
            const int64_t u = order[p];
            if (u < 0 || u >= M) { bad = 1; break; }
            const int64_t t = token[u];
            if (t < 0 || t >= T) { bad = 1; break; }
            const float *xt = x + t * d_in, *dyt = dy + t * d_out;
            const float g = gates[u], hu = h[u];
            const float a = act_value(kind, hu);
            const float dw = dot(v, dyt, d_out);
            dgates[u] = dw * a;
            const float dh = dw * g * act_grad(kind, hu);
            if (dh != 0.0f) {
                axpy(dx + t * d_in, dh, row, d_in);
                axpy(gr, dh, xt, d_in);
            }
            const float ga = g * a;
            if (ga != 0.0f) axpy(gr + d_in, ga, dyt, d_out);
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "peer_backward: an index is out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------- */
/* Row optimizers (tiers/_optimizer.py), fused with the cache's columns (tiers/_stack.py):     */
/* for each row i in slot s: step on delta[s] with grad[i] and state[s]; row[s] = base[s] +  */
/* delta[s]. `fresh[i]` marks a row read procedural: its delta and state start at zero and   */
/* its base is its current row (float32 pools only).                                         */

#define OPT_SGD 0
#define OPT_ADAGRAD 1
#define OPT_ADAM 2

/* The state width each optimizer kind's step reads and writes (floats per row): the kernel
 * owns it, and every step checks the caller's state column against it, so an optimizer whose
 * state does not fit (a subclass that changed its width) can never make a step write past a
 * row's state. -1: no such kind. */
static long long opt_width(int opt, long long dim) {
    switch (opt) {
    case OPT_SGD: return 0;
    case OPT_ADAGRAD: return 1;
    case OPT_ADAM: return dim + 2; /* [m (dim) | v | t] */
    default: return -1;
    }
}

/* What every optimizer step relies on: a known kind whose state width is `width`, dim >= 1,
 * and non-negative sizes. Sets a ValueError and returns 0 otherwise. */
static int step_ok(const char *who, int opt, long long dim, long long width, long long n,
                   long long capacity) {
    if (opt_width(opt, dim) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: unknown optimizer kind %d", who, opt);
        return 0;
    }
    if (dim < 1 || n < 0 || capacity < 0 || width != opt_width(opt, dim)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: optimizer kind %d needs state width %lld for dim %lld, got %lld "
                     "(n %lld, capacity %lld)",
                     who, opt, opt_width(opt, dim), dim, width, n, capacity);
        return 0;
    }
    return 1;
}

static PyObject *state_width(PyObject *self, PyObject *args) {
    int opt;
    long long dim;
    if (!PyArg_ParseTuple(args, "iL", &opt, &dim)) return NULL;
    if (dim < 1 || opt_width(opt, dim) < 0) {
        PyErr_Format(PyExc_ValueError, "state_width: unknown optimizer kind %d or dim %lld", opt,
                     dim);
        return NULL;
    }
    return PyLong_FromLongLong(opt_width(opt, dim));
}

/* Row i's learning rate: lr times its update scale (scale: NULL, every row 1). The step's
 * change of the delta is proportional to lr for every kind (SGD, Adagrad, Adam), so this
 * scales row i's update, not its gradient: the optimizer state still sees the whole gradient.
 * The wrapper (dpsn/_kernels.py) checks scale float32 [n] and finite. */
static inline double row_lr(double lr, const float *scale, long long i) {
    return scale ? lr * (double)scale[i] : lr;
}

/* One step on one row; with `base` and `row` also re-materializes row = base + delta in the
 * same pass (NULL: compact arrays without them). */
static inline void opt_step(int opt, float *delta, float *state, const float *g, long long dim,
                            float lr, float eps, float b1, float b2, const float *base,
                            float *row) {
    if (opt == OPT_SGD || opt == OPT_ADAGRAD) {
        float scale = lr;
        if (opt == OPT_ADAGRAD) {
            const float g2 = state[0] + dot(g, g, dim) / (float)dim;
            state[0] = g2;
            scale = lr / (sqrtf(g2) + eps);
        }
        if (row) {
            for (long long j = 0; j < dim; j++) {
                const float d = delta[j] - scale * g[j];
                delta[j] = d;
                row[j] = base[j] + d;
            }
        } else {
            for (long long j = 0; j < dim; j++) delta[j] -= scale * g[j];
        }
        return;
    }
    /* partial row-wise Adam: state = [m (dim) | v | t] */
    float *m = state, *v = state + dim, *t = state + dim + 1;
    const float sq = dot(g, g, dim);
    *v = b2 * *v + (1.0f - b2) * (sq / (float)dim);
    *t = *t + 1.0f;
    const float c1 = 1.0f - powf(b1, *t), c2 = 1.0f - powf(b2, *t);
    const float scale = lr / c1 / (sqrtf(*v / c2) + eps);
    for (long long j = 0; j < dim; j++) {
        m[j] = b1 * m[j] + (1.0f - b1) * g[j];
        const float d = delta[j] - scale * m[j];
        delta[j] = d;
        if (row) row[j] = base[j] + d;
    }
}

/* One row of apply_rows: a fresh row's delta and state start at zero, its current row its
 * base; then the step, re-materializing row = base + delta. */
static inline void step_cached_row(int opt, float *d, float *st, float *b, float *r, int fresh,
                                   const float *g, long long dim, long long width, double lr,
                                   double eps, double b1, double b2) {
    if (fresh) {
        memcpy(b, r, sizeof(float) * dim);
        memset(d, 0, sizeof(float) * dim);
        if (width) memset(st, 0, sizeof(float) * width);
    }
    opt_step(opt, d, st, g, dim, (float)lr, (float)eps, (float)b1, (float)b2, b, r);
}

HOT static PyObject *apply_rows(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, base_p, row_p, slots_p, fresh_p, grads_p, scale_p;
    long long capacity, dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    if (!PyArg_ParseTuple(args, "iKKKKLLLKKKLddddK", &opt, &delta_p, &state_p, &base_p, &row_p,
                          &capacity, &dim, &width, &slots_p, &fresh_p, &grads_p, &n, &lr, &eps,
                          &b1, &b2, &scale_p) ||
        !step_ok("apply_rows", opt, dim, width, n, capacity)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p, *base = (float *)base_p;
    float *row = (float *)row_p;
    const int64_t *slots = (const int64_t *)slots_p;
    const uint8_t *fresh = (const uint8_t *)fresh_p;
    const float *grads = (const float *)grads_p, *scale = (const float *)scale_p;
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        const int64_t s = slots[i];
        if (s < 0 || s >= capacity) { bad = 1; break; }
        if (i + 1 < n && slots[i + 1] >= 0 && slots[i + 1] < capacity) {
            const int64_t s1 = slots[i + 1];
            prefetch_row(delta + s1 * dim, dim);
            prefetch_row(base + s1 * dim, dim);
        }
        step_cached_row(opt, delta + s * dim, state + s * width, base + s * dim, row + s * dim,
                        fresh[i], grads + i * dim, dim, width, row_lr(lr, scale, i), eps, b1,
                        b2);
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "apply_rows: a slot is out of the cache");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The same optimizer math on compact host arrays (rows not in the cache): delta [n, dim] and
 * state [n, width] updated in place. Shares opt_step with apply_rows (the tests compare the
 * tracked pair bit for bit); against the PyTorch expressions of tiers/_optimizer.py the tests
 * allow float32 rounding (relative 1e-5: FMA contraction and another summation order). */
HOT static PyObject *step_rows(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, grads_p, scale_p;
    long long dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    if (!PyArg_ParseTuple(args, "iKKKLLLddddK", &opt, &delta_p, &state_p, &grads_p, &dim,
                          &width, &n, &lr, &eps, &b1, &b2, &scale_p) ||
        !step_ok("step_rows", opt, dim, width, n, 0)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p;
    const float *grads = (const float *)grads_p, *scale = (const float *)scale_p;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        opt_step(opt, delta + i * dim, state + i * width, grads + i * dim, dim,
                 (float)row_lr(lr, scale, i),
                 (float)eps, (float)b1, (float)b2, NULL, NULL);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------- */
/* Usage statistics of a row lifecycle (tiers/_usage.py), in place in the cache's float64     */
/* usage column: what a page-in (`touch`) and a row step (`start`, `updated`) record, for     */
/* the rows of one step in one pass instead of ~30 PyTorch ops over gathered copies.          */
/*                                                                                            */
/* The same double operations as the PyTorch path (tiers/_usage.py), in the same order,     */
/* each rounded (no fused multiply-add: FP contraction is off here, unlike the optimizer     */
/* loops). What the tests check (tests/test_usage_kernels.py): every field bit for bit but   */
/* RECENT, whose decay pow(use_decay, steps since last use) comes from libm here (PyTorch's  */
/* vectorized pow may differ in the last bit; relative 1e-12), and UPDATE, which takes the   */
/* gradient's float32 norm summed in another order (relative 1e-6).                          */
/* Field numbers: tiers/_usage_fields.py (never renumbered).                                 */

#define U_PHASE 0
#define U_USES 1
#define U_LAST 2
#define U_RECENT 3
#define U_HISTORY 4
#define U_UPDATE 5
#define U_NORM 6
#define U_EPOCH 7
#define U_SINCE 8
#define U_BORN 9
#define U_WIDTH 10
#define U_HISTORY_BITS 32

#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif
#if defined(__clang__)
#define NO_CONTRACT_HERE _Pragma("clang fp contract(off)")
#else
#define NO_CONTRACT_HERE
#endif

/* The usage rows of a batch's slots are random cache misses (80 bytes each in a column of
 * megabytes); asking for the row a few slots ahead overlaps them instead of waiting on each. */
#define U_AHEAD 8
static inline void prefetch_usage(const double *col, const int64_t *slots, long long i,
                                  long long n, long long capacity) {
    if (i + U_AHEAD < n) {
        const int64_t s = slots[i + U_AHEAD];
        if (s >= 0 && s < capacity) {
            __builtin_prefetch(col + s * U_WIDTH);
            __builtin_prefetch(col + s * U_WIDTH + U_WIDTH - 1);
        }
    }
}

/* pow(use_decay, k) for the small step gaps k most uses have (a row used again soon), from a
 * table filled once per call: libm's pow costs more than the rest of a row's statistics. */
#define U_POWERS 64
static void decay_powers(double *powers, double use_decay) {
    for (int k = 0; k < U_POWERS; k++) powers[k] = pow(use_decay, (double)k);
}

/* _usage.touch of one row with statistics: used `uses` times in step `step`. RECENT decays by
 * pow(use_decay, steps since the last use) from libm, which may differ from PyTorch's
 * vectorized pow in the last bit. */
static inline __attribute__((always_inline)) void usage_used(double *u, int64_t uses,
                                                             long long step, long long epoch,
                                                             double use_decay,
                                                             const double *powers) {
    double shift = (double)step - u[U_LAST];
    if (shift < 0.0) shift = 0.0;
    const double decay = shift < U_POWERS ? powers[(int)shift] : pow(use_decay, shift);
    const double recent = u[U_RECENT] * decay;
    const int64_t sh = (int64_t)(shift > U_HISTORY_BITS ? U_HISTORY_BITS : shift);
    const int64_t keep = ((int64_t)1 << (U_HISTORY_BITS - sh)) - 1;
    const int64_t hist = ((int64_t)u[U_HISTORY] & keep) << sh;
    const double fresh_step = (hist & 1) == 0 ? 1.0 : 0.0;
    u[U_RECENT] = recent + (1.0 - use_decay) * fresh_step;
    u[U_HISTORY] = (double)(hist | 1);
    u[U_LAST] = (double)step;
    u[U_USES] += (double)uses;
    u[U_SINCE] = (double)epoch;
    u[U_EPOCH] = (double)(epoch + 1);
}

/* A use of the trained rows among slots[i] (counts[i] times) in step `step`, in one pass
 * (usage_used). Rows without a delta (!trained) are left alone; trained rows are marked dirty,
 * and those with statistics (not NaN) record the use. */
static PyObject *usage_touch(PyObject *self, PyObject *args) {
    unsigned long long col_p, slots_p, counts_p, trained_p, dirty_p;
    long long capacity, n, step, epoch;
    double use_decay;
    if (!PyArg_ParseTuple(args, "KLKKKKLLLd", &col_p, &capacity, &slots_p, &counts_p,
                          &trained_p, &dirty_p, &n, &step, &epoch, &use_decay)) {
        return NULL;
    }
    if (capacity < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "usage_touch: negative sizes");
        return NULL;
    }
    double *col = (double *)col_p;
    const int64_t *slots = (const int64_t *)slots_p, *counts = (const int64_t *)counts_p;
    const uint8_t *trained = (const uint8_t *)trained_p;
    uint8_t *dirty = (uint8_t *)dirty_p;
    double powers[U_POWERS];
    decay_powers(powers, use_decay);
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        const int64_t s = slots[i];
        if (s < 0 || s >= capacity) { bad = 1; break; }
        prefetch_usage(col, slots, i, n, capacity);
        if (!trained[s]) continue;
        dirty[s] = 1;
        double *u = col + s * U_WIDTH;
        if (!isnan(u[U_PHASE])) usage_used(u, counts[i], step, epoch, use_decay, powers);
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "usage_touch: a slot is out of the cache");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* What a row step records in a row's statistics (_usage.start for a row getting its first
 * delta, or one without statistics; then _usage.updated with the gradient's norm). */
static inline __attribute__((always_inline)) void usage_stepped(
    double *u, int start, int64_t uses, double norm, long long step, long long epoch,
    double use_decay, double update_decay) {
    if (start || isnan(u[U_PHASE])) {
        for (int f = 0; f < U_WIDTH; f++) u[f] = 0.0;
        u[U_USES] = (double)uses;
        u[U_LAST] = (double)step;
        u[U_RECENT] = 1.0 - use_decay;
        u[U_HISTORY] = 1.0;
        u[U_SINCE] = (double)epoch;
        u[U_BORN] = (double)epoch;
    }
    u[U_UPDATE] = update_decay * u[U_UPDATE] + (1.0 - update_decay) * norm;
    u[U_EPOCH] = (double)(epoch + 1);
}

/* A lifecycle's rates and clock, as the tracked row steps take them. */
typedef struct {
    long long step, epoch;
    double use_decay, update_decay, inertia;
    int touch;
    double powers[U_POWERS];
} usage_rates;

/* One row step with a lifecycle's statistics u (a row of the usage column): with `touch`, a
 * row with statistics first records this step's use (usage_used, as usage_touch would have at
 * the page-in); then the optimizer step (base/row: NULL on compact arrays); a SCREENED row's
 * change is damped by 1 / (1 + inertia * log1p(uses)) (_usage.damping); last the statistics
 * record the step (usage_stepped, with the float32 norm of the gradient). `fresh`: the row
 * had no delta (its delta and state start at zero, its current row is its base). `old`:
 * scratch of dim floats. The one definition both tracked loops use, so a row gets the same
 * bits whether it was stepped in the cache or spilled. */
static inline __attribute__((always_inline)) void tracked_row(
    int opt, float *d, float *st, float *b, float *r, int fresh, const float *g, long long dim,
    long long width, double lr, double eps, double b1, double b2, double *u, int64_t uses,
    const usage_rates *rt, float *old) {
    if (rt->touch && !fresh && !isnan(u[U_PHASE]))
        usage_used(u, uses, rt->step, rt->epoch, rt->use_decay, rt->powers);
    const int screened = !fresh && u[U_PHASE] == 1.0;
    if (screened) memcpy(old, d, sizeof(float) * dim);
    if (b) {
        step_cached_row(opt, d, st, b, r, fresh, g, dim, width, lr, eps, b1, b2);
    } else {
        opt_step(opt, d, st, g, dim, (float)lr, (float)eps, (float)b1, (float)b2, NULL, NULL);
    }
    if (screened) {
        const float damp = (float)(1.0 / (1.0 + rt->inertia * log1p(u[U_USES])));
        for (long long j = 0; j < dim; j++) {
            const float v = old[j] + (d[j] - old[j]) * damp;
            d[j] = v;
            if (b) r[j] = b[j] + v;
        }
    }
    const double norm = (double)sqrtf(dot(g, g, dim));
    usage_stepped(u, fresh, uses, norm, rt->step, rt->epoch, rt->use_decay, rt->update_decay);
}

static int parse_rates(PyObject *args, usage_rates *rt) {
    if (!PyArg_ParseTuple(args, "LLdddp", &rt->step, &rt->epoch, &rt->use_decay,
                          &rt->update_decay, &rt->inertia, &rt->touch)) {
        return 0;
    }
    decay_powers(rt->powers, rt->use_decay);
    return 1;
}

/* apply_rows with a lifecycle's statistics (tracked_row), in the same pass: a row is fresh
 * when it has no delta yet (!trained[s]). One visit per row instead of a phase scan before the
 * step and a statistics pass after it, which each missed the cache on every row. */
HOT static PyObject *apply_rows_tracked(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, base_p, row_p, slots_p, grads_p, col_p, trained_p,
        counts_p, scale_p;
    long long capacity, dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    PyObject *rates_args;
    usage_rates rt;
    if (!PyArg_ParseTuple(args, "iKKKKLLLKKLddddKKKO!K", &opt, &delta_p, &state_p, &base_p,
                          &row_p, &capacity, &dim, &width, &slots_p, &grads_p, &n, &lr, &eps,
                          &b1, &b2, &col_p, &trained_p, &counts_p, &PyTuple_Type,
                          &rates_args, &scale_p) ||
        !parse_rates(rates_args, &rt) ||
        !step_ok("apply_rows_tracked", opt, dim, width, n, capacity)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p, *base = (float *)base_p;
    float *row = (float *)row_p;
    const int64_t *slots = (const int64_t *)slots_p, *counts = (const int64_t *)counts_p;
    const float *grads = (const float *)grads_p, *scale = (const float *)scale_p;
    double *col = (double *)col_p;
    const uint8_t *trained = (const uint8_t *)trained_p;
    float *old = (float *)malloc(sizeof(float) * (dim > 0 ? dim : 1));
    if (!old) return PyErr_NoMemory();
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        const int64_t s = slots[i];
        if (s < 0 || s >= capacity) { bad = 1; break; }
        if (i + 1 < n && slots[i + 1] >= 0 && slots[i + 1] < capacity) {
            const int64_t s1 = slots[i + 1];
            prefetch_row(delta + s1 * dim, dim);
            prefetch_row(base + s1 * dim, dim);
        }
        prefetch_usage(col, slots, i, n, capacity);
        tracked_row(opt, delta + s * dim, state + s * width, base + s * dim, row + s * dim,
                    !trained[s], grads + i * dim, dim, width, row_lr(lr, scale, i), eps, b1, b2,
                    col + s * U_WIDTH, counts[i], &rt, old);
    }
    Py_END_ALLOW_THREADS
    free(old);
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "apply_rows_tracked: a slot is out of the cache");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The same tracked step on compact host arrays (a spilled batch, rows not in the cache):
 * delta [n, dim], state [n, width] and usage [n, U_WIDTH] updated in place; a row without
 * statistics (NaN) starts them. */
HOT static PyObject *step_rows_tracked(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, grads_p, usage_p, counts_p, scale_p;
    long long dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    PyObject *rates_args;
    usage_rates rt;
    if (!PyArg_ParseTuple(args, "iKKKLLLddddKKO!K", &opt, &delta_p, &state_p, &grads_p, &dim,
                          &width, &n, &lr, &eps, &b1, &b2, &usage_p, &counts_p, &PyTuple_Type,
                          &rates_args, &scale_p) ||
        !parse_rates(rates_args, &rt) || !step_ok("step_rows_tracked", opt, dim, width, n, 0)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p;
    const float *grads = (const float *)grads_p, *scale = (const float *)scale_p;
    double *usage = (double *)usage_p;
    const int64_t *counts = (const int64_t *)counts_p;
    float *old = (float *)malloc(sizeof(float) * (dim > 0 ? dim : 1));
    if (!old) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        tracked_row(opt, delta + i * dim, state + i * width, NULL, NULL, 0, grads + i * dim,
                    dim, width, row_lr(lr, scale, i), eps, b1, b2, usage + i * U_WIDTH,
                    counts[i], &rt, old);
    }
    Py_END_ALLOW_THREADS
    free(old);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------- */
/* Product-key search (index/_product_keys.py): for each query and head, the exact top-k of  */
/* s1[i] + s2[j] over rows i * n2 + j < n_valid, from the top-k of each half (PKM).          */

/* Insert (x, id) into v[0:len], sorted descending, dropping its last entry (x must beat it,
 * or it is a free place). Equal values keep their order (the earlier first). */
static inline void insert_sorted(float *v, int64_t *ids, long long len, float x, int64_t id) {
    long long p = len - 1;
    while (p > 0 && v[p - 1] < x) {
        v[p] = v[p - 1];
        ids[p] = ids[p - 1];
        p--;
    }
    v[p] = x;
    ids[p] = id;
}

/* Continue a top-k: v[0:len] holds the best len values seen (sorted descending, full); scan
 * src_v[j] for start <= j < n (ids src_ids[j], or j * mul + add) into it.
 *
 * Why not a heap: for the small k routing asks for (8-64), a sorted array that a value enters
 * by a short shift is faster (a heap's sift mispredicts a branch per level), and after the
 * first few blocks almost no value beats the k-th best: blocks of 8 are compared with it at
 * once (vectorized) and skipped whole. */
static void top_k_scan(const float *src_v, long long start, long long n, int64_t mul,
                       int64_t add, const int64_t *src_ids, long long len, float *v,
                       int64_t *ids) {
    float thr = v[len - 1];
    long long j = start;
    for (; j + 8 <= n; j += 8) {
        int any = 0;
        for (int u = 0; u < 8; u++) any |= src_v[j + u] > thr;
        if (!any) continue;
        for (long long u = j; u < j + 8; u++) {
            const float x = src_v[u];
            if (x > thr) {
                insert_sorted(v, ids, len, x, src_ids ? src_ids[u] : u * mul + add);
                thr = v[len - 1];
            }
        }
    }
    for (; j < n; j++) {
        const float x = src_v[j];
        if (x > thr) {
            insert_sorted(v, ids, len, x, src_ids ? src_ids[j] : j * mul + add);
            thr = v[len - 1];
        }
    }
}

/* The largest min(k, n) of (src_v[j], id(j)) for j < n into (v, ids), sorted descending; ids
 * are src_ids[j], or j * mul + add without src_ids. */
static long long top_k(const float *src_v, long long n, int64_t mul, int64_t add,
                       const int64_t *src_ids, long long k, float *v, int64_t *ids) {
    const long long len = n < k ? n : k;
    for (long long j = 0; j < len; j++) { /* insertion sort of the first len */
        insert_sorted(v, ids, j + 1, src_v[j], src_ids ? src_ids[j] : j * mul + add);
    }
    if (len > 0) top_k_scan(src_v, len, n, mul, add, src_ids, len, v, ids);
    return len;
}

#ifdef HAVE_AVX2_PATHS
/* The same top-k for k <= 16 with AVX2: the best values in 16 lanes (two registers' worth,
 * sorted descending; lanes past k hold values no better than the k-th, or -inf) and their
 * positions as int32. A value enters where insert_sorted would put it: after the last of the
 * first q_max lanes that it does not beat (!(v < x): equal values keep the earlier first, and a
 * NaN on either side stops it, as it stops insert_sorted's loop); the lanes after move one
 * place in a blend: no loop and no data-dependent branch per shifted entry, which is what the
 * scalar insertion spends its time on. */
typedef struct {
    float v[16] __attribute__((aligned(32)));
    int32_t pos[16] __attribute__((aligned(32)));
} top16;

__attribute__((target("avx2"))) static inline void top16_insert(top16 *t, float x, int32_t at,
                                                                 int q_max) {
    const __m256 lo = _mm256_load_ps(t->v), hi = _mm256_load_ps(t->v + 8);
    const __m256 xv = _mm256_set1_ps(x);
    const unsigned stop =
        ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lo, xv, _CMP_NLT_UQ)) |
         ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(hi, xv, _CMP_NLT_UQ)) << 8)) &
        ((1u << q_max) - 1u);
    const int q = stop ? 32 - __builtin_clz(stop) : 0;
    const __m256i lane_lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lane_hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i qv = _mm256_set1_epi32(q);
    const __m256i prev = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
    const __m256i plo = _mm256_load_si256((const __m256i *)t->pos);
    const __m256i phi = _mm256_load_si256((const __m256i *)(t->pos + 8));
    /* each lane's left neighbour: [lo0, lo0..lo6] and [lo7, hi0..hi6] */
    __m256 slo = _mm256_permutevar8x32_ps(lo, prev);
    __m256 shi = _mm256_blend_ps(_mm256_permutevar8x32_ps(hi, prev),
                                 _mm256_permutevar8x32_ps(lo, _mm256_set1_epi32(7)), 1);
    __m256i splo = _mm256_permutevar8x32_epi32(plo, prev);
    __m256i sphi = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(phi, prev),
                                      _mm256_permutevar8x32_epi32(plo, _mm256_set1_epi32(7)), 1);
    const __m256i keep_lo = _mm256_cmpgt_epi32(qv, lane_lo), keep_hi = _mm256_cmpgt_epi32(qv, lane_hi);
    const __m256i here_lo = _mm256_cmpeq_epi32(qv, lane_lo), here_hi = _mm256_cmpeq_epi32(qv, lane_hi);
    const __m256i atv = _mm256_set1_epi32(at);
    slo = _mm256_blendv_ps(slo, xv, _mm256_castsi256_ps(here_lo));
    shi = _mm256_blendv_ps(shi, xv, _mm256_castsi256_ps(here_hi));
    splo = _mm256_blendv_epi8(splo, atv, here_lo);
    sphi = _mm256_blendv_epi8(sphi, atv, here_hi);
    _mm256_store_ps(t->v, _mm256_blendv_ps(slo, lo, _mm256_castsi256_ps(keep_lo)));
    _mm256_store_ps(t->v + 8, _mm256_blendv_ps(shi, hi, _mm256_castsi256_ps(keep_hi)));
    _mm256_store_si256((__m256i *)t->pos, _mm256_blendv_epi8(splo, plo, keep_lo));
    _mm256_store_si256((__m256i *)(t->pos + 8), _mm256_blendv_epi8(sphi, phi, keep_hi));
}

/* Scan src[j] for start <= j < n into a full top-len (len <= 16); blocks of 8 that nothing
 * in beats the len-th best are skipped with one compare. */
__attribute__((target("avx2"))) static void top16_scan(top16 *t, const float *src,
                                                      long long start, long long n, int len) {
    float thr = t->v[len - 1];
    long long j = start;
    for (; j + 8 <= n; j += 8) {
        unsigned m = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(src + j), _mm256_set1_ps(thr), _CMP_GT_OQ));
        while (m) {
            const int u = __builtin_ctz(m);
            m &= m - 1;
            const float x = src[j + u];
            if (x > thr) {
                top16_insert(t, x, (int32_t)(j + u), len - 1);
                thr = t->v[len - 1];
            }
        }
    }
    for (; j < n; j++) {
        const float x = src[j];
        if (x > thr) {
            top16_insert(t, x, (int32_t)j, len - 1);
            thr = t->v[len - 1];
        }
    }
}

/* The best min(k, n) of src[0:n] (k <= 16) into t, sorted descending; returns how many. */
__attribute__((target("avx2"))) static int top16_of(top16 *t, const float *src, long long n,
                                                    int k) {
    const int len = n < k ? (int)n : k;
    for (int i = 0; i < 16; i++) {
        t->v[i] = -INFINITY;
        t->pos[i] = -1;
    }
    for (int j = 0; j < len; j++) top16_insert(t, src[j], j, j);
    if (len > 0) top16_scan(t, src, len, n, len);
    return len;
}

static int have_avx2 = 0;

/* pk_search's selection for one query and head when k <= 16 (see pk_search). */
__attribute__((target("avx2"))) static int pk_select16(const float *sa, const float *sb,
                                                       long long n2, long long k, long long f,
                                                       long long r, float *pv, int64_t *pi,
                                                       int64_t *dst_i, float *dst_v) {
    top16 a, b, c, o;
    const int ik = (int)k;
    const int na = top16_of(&a, sa, f, ik);
    int nb, nc = 0;
    if (r >= k) { /* one pass over half b: its first r, then the rest from there */
        nc = top16_of(&c, sb, r, ik);
        b = c;
        top16_scan(&b, sb, r, n2, ik);
        nb = ik;
    } else {
        nb = top16_of(&b, sb, n2, ik);
        if (r) nc = top16_of(&c, sb, r, ik);
    }
    long long np = 0;
    for (int i = 0; i < na; i++) {
        for (int j = 0; j < nb && (i + 1) * (j + 1) <= ik; j++) {
            pv[np] = a.v[i] + b.v[j];
            pi[np++] = (int64_t)a.pos[i] * n2 + b.pos[j];
        }
    }
    for (int j = 0; j < nc; j++) { /* the partial last grid row f */
        pv[np] = sa[f] + c.v[j];
        pi[np++] = f * n2 + c.pos[j];
    }
    const int no = top16_of(&o, pv, np, ik);
    for (int j = 0; j < no; j++) {
        dst_v[j] = o.v[j];
        dst_i[j] = pi[o.pos[j]];
    }
    return no;
}
#endif

/* Selection over precomputed sub-key scores s1 [H, T, n1], s2 [H, T, n2] (row f of s1 is the
 * partial grid row when r > 0): ids and vals [T, H, k]. `simd`: the AVX2 selection may run
 * (k <= 16, a CPU that has it); 0 keeps the scalar one (tests compare the two). With per-query budgets kq [T] (a null
 * pointer: none), query t's search stops at its best min(kq[t], k) rows (the first ones of
 * the full search's list) and the rest of its entries are padding (-1, -inf): a small budget
 * costs a small search. */
HOT static PyObject *pk_search(PyObject *self, PyObject *args) {
    unsigned long long s1_p, s2_p, ids_p, vals_p, kq_p;
    long long T, H, n1, n2, k_all, f, r;
    int simd;
    if (!PyArg_ParseTuple(args, "KKLLLLLLLKKKp", &s1_p, &s2_p, &T, &H, &n1, &n2, &k_all, &f,
                          &r, &ids_p, &vals_p, &kq_p, &simd)) {
        return NULL;
    }
    const int64_t *kq = (const int64_t *)kq_p;
    const float *s1 = (const float *)s1_p, *s2 = (const float *)s2_p;
    int64_t *out_ids = (int64_t *)ids_p;
    float *out_vals = (float *)vals_p;
    if (T < 0 || H < 0 || n1 < 1 || n2 < 1 || k_all < 1 || f < 0 || f > n1 || r < 0 ||
        r >= n2 || (f == n1 && r) || (f == 0 && !r)) {
        PyErr_SetString(PyExc_ValueError, "pk_search: bad grid");
        return NULL;
    }
    long long pairs = 0;
    for (long long i = 0; i < k_all; i++) pairs += k_all / (i + 1);
    const long long cap = 3 * k_all + pairs + k_all + 8;
    float *buf = (float *)PyMem_RawMalloc(sizeof(float) * cap);
    int64_t *ibuf = (int64_t *)PyMem_RawMalloc(sizeof(int64_t) * cap);
    if (!buf || !ibuf) {
        PyMem_RawFree(buf);
        PyMem_RawFree(ibuf);
        return PyErr_NoMemory();
    }
    float *av = buf, *bv = buf + k_all, *cv = bv + k_all, *pv = cv + k_all;
    int64_t *ai = ibuf, *bi = ibuf + k_all, *ci = bi + k_all, *pi = ci + k_all;
    Py_BEGIN_ALLOW_THREADS
    for (long long h = 0; h < H; h++) {
        for (long long t = 0; t < T; t++) {
            const float *sa = s1 + (h * T + t) * n1, *sb = s2 + (h * T + t) * n2;
            int64_t *dst_i = out_ids + (t * H + h) * k_all;
            float *dst_v = out_vals + (t * H + h) * k_all;
            const long long k = kq ? (kq[t] < 1 ? 1 : kq[t] > k_all ? k_all : kq[t]) : k_all;
#ifdef HAVE_AVX2_PATHS
            if (simd && k_all <= 16 && have_avx2) {
                const int no = pk_select16(sa, sb, n2, k, f, r, pv, pi, dst_i, dst_v);
                for (long long j = no; j < k_all; j++) {
                    dst_i[j] = -1;
                    dst_v[j] = -INFINITY;
                }
                continue;
            }
#endif
            const long long na = top_k(sa, f, 1, 0, NULL, k, av, ai);
            long long nb, nc = 0;
            if (r >= k) { /* one pass over half b: its first r, then the rest from there */
                nc = top_k(sb, r, 1, 0, NULL, k, cv, ci);
                memcpy(bv, cv, sizeof(float) * k);
                memcpy(bi, ci, sizeof(int64_t) * k);
                top_k_scan(sb, r, n2, 1, 0, NULL, k, bv, bi);
                nb = k;
            } else {
                nb = top_k(sb, n2, 1, 0, NULL, k, bv, bi);
                if (r) nc = top_k(sb, r, 1, 0, NULL, k, cv, ci);
            }
            /* pairs that can reach the top-k of a sum of two sorted lists: (i+1)(j+1) <= k */
            long long np = 0;
            for (long long i = 0; i < na; i++) {
                for (long long j = 0; j < nb && (i + 1) * (j + 1) <= k; j++) {
                    pv[np] = av[i] + bv[j];
                    pi[np++] = ai[i] * n2 + bi[j];
                }
            }
            for (long long j = 0; j < nc; j++) { /* the partial last grid row f */
                pv[np] = sa[f] + cv[j];
                pi[np++] = f * n2 + ci[j];
            }
            const long long no = top_k(pv, np, 0, 0, pi, k, dst_v, dst_i);
            for (long long j = no; j < k_all; j++) {
                dst_i[j] = -1;
                dst_v[j] = -INFINITY;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    PyMem_RawFree(ibuf);
    Py_RETURN_NONE;
}

/* The gradient of the selected scores s[t,h,j] = q_a . keys1[h, i1] + q_b . keys2[h, i2]
 * (grid id = i1 * n2 + i2): into dq [T, H, 2e] (written) and dkeys1, dkeys2 (accumulated). */
HOT static PyObject *pk_scores_backward(PyObject *self, PyObject *args) {
    unsigned long long q_p, k1_p, k2_p, ids_p, g_p, dq_p, dk1_p, dk2_p;
    long long T, H, e, n1, n2, k;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLKKK", &q_p, &k1_p, &k2_p, &ids_p, &g_p, &T, &H, &e,
                          &n1, &n2, &k, &dq_p, &dk1_p, &dk2_p)) {
        return NULL;
    }
    if (T < 0 || H < 0 || e < 0 || n1 < 1 || n2 < 1 || k < 0) { /* ids are split by n2 */
        PyErr_SetString(PyExc_ValueError, "pk_scores_backward: bad sizes");
        return NULL;
    }
    const float *q = (const float *)q_p, *keys1 = (const float *)k1_p;
    const float *keys2 = (const float *)k2_p, *grad = (const float *)g_p;
    const int64_t *ids = (const int64_t *)ids_p;
    float *dq = (float *)dq_p, *dk1 = (float *)dk1_p, *dk2 = (float *)dk2_p;
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < T && !bad; t++) {
        for (long long h = 0; h < H; h++) {
            const long long base = (t * H + h);
            const float *qa = q + base * 2 * e, *qb = qa + e;
            float *dqa = dq + base * 2 * e, *dqb = dqa + e;
            memset(dqa, 0, sizeof(float) * 2 * e);
            for (long long j = 0; j < k; j++) {
                const int64_t id = ids[base * k + j];
                const float g = grad[base * k + j];
                if (id < 0 || g == 0.0f) continue;
                const int64_t i1 = id / n2, i2 = id % n2;
                if (i1 >= n1) { bad = 1; break; }
                const float *ka = keys1 + (h * n1 + i1) * e, *kb = keys2 + (h * n2 + i2) * e;
                axpy(dqa, g, ka, e);
                axpy(dqb, g, kb, e);
                axpy(dk1 + (h * n1 + i1) * e, g, qa, e);
                axpy(dk2 + (h * n2 + i2) * e, g, qb, e);
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "pk_scores_backward: an id is outside the grid");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pk_scores_backward", pk_scores_backward, METH_VARARGS, "Product-key score gradients."},
    {"pk_search", pk_search, METH_VARARGS, "Exact product-key top-k per query and head."},
    {"group_ids", group_ids, METH_VARARGS, "Distinct ids, counts, inverse and order by id."},
    {"cuckoo_find", cuckoo_find, METH_VARARGS, "Cuckoo lookup of ids: slots, hit flags."},
    {"cuckoo_insert", cuckoo_insert, METH_VARARGS, "Cuckoo insertion of new ids and slots."},
    {"find_gather", find_gather, METH_VARARGS, "Hot read: find slots, gather rows if all hit."},
    {"peer_forward", peer_forward, METH_VARARGS, "PEER forward over rows by index."},
    {"peer_backward", peer_backward, METH_VARARGS, "PEER backward: dx, dgates, row grads."},
    {"apply_rows", apply_rows, METH_VARARGS, "Row optimizer step on cache columns."},
    {"step_rows", step_rows, METH_VARARGS, "Row optimizer step on compact arrays."},
    {"state_width", state_width, METH_VARARGS, "State floats per row of an optimizer kind."},
    {"usage_touch", usage_touch, METH_VARARGS, "A lifecycle's use of cached rows."},
    {"apply_rows_tracked", apply_rows_tracked, METH_VARARGS,
     "apply_rows recording a lifecycle's statistics."},
    {"step_rows_tracked", step_rows_tracked, METH_VARARGS,
     "step_rows recording a lifecycle's statistics."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#ifdef HAVE_AVX2_PATHS
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
