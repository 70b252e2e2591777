/*
 * dpsn._native: fused CPU loops for the row path's hot spots.
 *
 * Why C: on the CPU each PyTorch op costs a few microseconds of dispatch whatever its size,
 * and the row path's work comes in many small ops (a hash probe is ~10 of them) or in many
 * passes over the same rows (gather, compute, scatter, optimizer, re-materialize). Each
 * function here does one such job in one pass, with the GIL released. Nothing here allocates
 * or owns memory: the Python wrappers (tiers/_native.py) check every tensor (CPU, contiguous,
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

#define ACT_GELU 0
#define ACT_RELU 1
#define ACT_SILU 2
#define ACT_TANH 3

/* ---------------------------------------------------------------------------------------- */
/* cuckoo lookup (tiers/_slot_table.py)                                                      */

static inline int64_t place(int64_t id, int64_t mult, int bits) {
    /* the top `bits` bits of the wrapped product, as the PyTorch path computes them */
    uint64_t h = (uint64_t)id * (uint64_t)mult;
    return (int64_t)(h >> (64 - bits));
}

static PyObject *cuckoo_find(PyObject *self, PyObject *args) {
    unsigned long long entries_p, slot_ids_p, ids_p, out_slots_p, out_hit_p;
    long long n, half, capacity, mult0, mult1;
    int bits, wide;
    if (!PyArg_ParseTuple(args, "KiLiLLLKKLKK", &entries_p, &wide, &half, &bits, &mult0,
                          &mult1, &capacity, &slot_ids_p, &ids_p, &n, &out_slots_p, &out_hit_p)) {
        return NULL;
    }
    const int32_t *e32 = (const int32_t *)entries_p;
    const int64_t *e64 = (const int64_t *)entries_p;
    const int64_t *slot_ids = (const int64_t *)slot_ids_p;
    const int64_t *ids = (const int64_t *)ids_p;
    int64_t *out_slots = (int64_t *)out_slots_p;
    uint8_t *out_hit = (uint8_t *)out_hit_p;
    long long hits = 0, bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        int64_t id = ids[i];
        int64_t at = place(id, mult0, bits);
        int64_t s = wide ? e64[at] : (int64_t)e32[at];
        if (s < 0 || s > capacity) { bad = 1; break; }
        if (slot_ids[s] != id) {
            at = place(id, mult1, bits) + half;
            s = wide ? e64[at] : (int64_t)e32[at];
            if (s < 0 || s > capacity) { bad = 1; break; }
        }
        uint8_t hit = slot_ids[s] == id;
        out_hit[i] = hit;
        out_slots[i] = s < capacity ? s : capacity - 1;
        hits += hit;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_RuntimeError, "cuckoo_find: a table entry names no slot");
        return NULL;
    }
    return PyLong_FromLongLong(hits);
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

static inline float dot(const float *a, const float *b, long long n) {
    float acc = 0.0f;
    for (long long j = 0; j < n; j++) acc += a[j] * b[j];
    return acc;
}

static inline void axpy(float *y, float a, const float *x, long long n) {
    for (long long j = 0; j < n; j++) y[j] += a * x[j];
}

/* ---------------------------------------------------------------------------------------- */
/* PEER executor (pool/_layer.py), over a packed layout: token t's uses are
 * [off[t], off[t+1]) (a budget below k_max leaves no padding to compute); use u reads row
 * s = idx[u] = (u | v) of the table with gate g[u]:
 *   y[t] = sum_u g[u] act(x[t] . u_s) v_s                                                  */

static PyObject *peer_forward(PyObject *self, PyObject *args) {
    unsigned long long table_p, idx_p, off_p, x_p, gates_p, y_p, h_p;
    long long rows, dim, d_in, T, M;
    int kind;
    if (!PyArg_ParseTuple(args, "KLLLKKKKLLiKK", &table_p, &rows, &dim, &d_in, &idx_p, &off_p,
                          &x_p, &gates_p, &T, &M, &kind, &y_p, &h_p)) {
        return NULL;
    }
    const float *table = (const float *)table_p;
    const int64_t *idx = (const int64_t *)idx_p, *off = (const int64_t *)off_p;
    const float *x = (const float *)x_p, *gates = (const float *)gates_p;
    float *y = (float *)y_p, *h = (float *)h_p;
    const long long d_out = dim - d_in;
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < T && !bad; t++) {
        const float *xt = x + t * d_in;
        float *yt = y + t * d_out;
        memset(yt, 0, sizeof(float) * d_out);
        const int64_t lo = off[t], hi = off[t + 1];
        if (lo < 0 || hi < lo || hi > M) { bad = 1; break; }
        for (int64_t u = lo; u < hi; u++) {
            const int64_t s = idx[u];
            if (s < 0 || s >= rows) { bad = 1; break; }
            const float *row = table + s * dim;
            const float hu = dot(xt, row, d_in);
            h[u] = hu;
            const float w = gates[u] * act_value(kind, hu);
            if (w != 0.0f) axpy(yt, w, row + d_in, d_out);
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "peer_forward: a row or use index is out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Backward: dx, dgates, and each distinct row's summed gradient (row r = inv[u]), in the
 * order of the uses, so the sums are the same bits on every path that calls this. */
static PyObject *peer_backward(PyObject *self, PyObject *args) {
    unsigned long long table_p, idx_p, inv_p, off_p, x_p, gates_p, h_p, dy_p, dx_p, dg_p, rg_p;
    long long rows, dim, d_in, T, M, n_rows;
    int kind;
    if (!PyArg_ParseTuple(args, "KLLLKKKKKKKLLiKKKL", &table_p, &rows, &dim, &d_in, &idx_p,
                          &inv_p, &off_p, &x_p, &gates_p, &h_p, &dy_p, &T, &M, &kind, &dx_p,
                          &dg_p, &rg_p, &n_rows)) {
        return NULL;
    }
    const float *table = (const float *)table_p;
    const int64_t *idx = (const int64_t *)idx_p, *inv = (const int64_t *)inv_p;
    const int64_t *off = (const int64_t *)off_p;
    const float *x = (const float *)x_p, *gates = (const float *)gates_p;
    const float *h = (const float *)h_p, *dy = (const float *)dy_p;
    float *dx = (float *)dx_p, *dgates = (float *)dg_p, *rowgrad = (float *)rg_p;
    const long long d_out = dim - d_in;
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 0; t < T && !bad; t++) {
        const float *xt = x + t * d_in, *dyt = dy + t * d_out;
        float *dxt = dx + t * d_in;
        memset(dxt, 0, sizeof(float) * d_in);
        const int64_t lo = off[t], hi = off[t + 1];
        if (lo < 0 || hi < lo || hi > M) { bad = 1; break; }
        for (int64_t u = lo; u < hi; u++) {
            const int64_t s = idx[u], r = inv[u];
            if (s < 0 || s >= rows || r < 0 || r >= n_rows) { bad = 1; break; }
            const float *row = table + s * dim, *v = row + d_in;
            const float g = gates[u], hu = h[u];
            const float a = act_value(kind, hu);
            const float dw = dot(v, dyt, d_out);
            dgates[u] = dw * a;
            const float dh = dw * g * act_grad(kind, hu);
            float *gr = rowgrad + r * dim;
            if (dh != 0.0f) {
                axpy(dxt, dh, row, d_in);
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
/* Row optimizers (pool/_optim.py), fused with the cache's columns (tiers/_stack.py):         */
/* for each row i in slot s: step on delta[s] with grad[i] and state[s]; row[s] = base[s] +  */
/* delta[s]. `fresh[i]` marks a row read procedural: its delta and state start at zero and   */
/* its base is its current row (float32 pools only).                                         */

#define OPT_SGD 0
#define OPT_ADAGRAD 1
#define OPT_ADAM 2

static inline void opt_step(int opt, float *delta, float *state, const float *g, long long dim,
                            float lr, float eps, float b1, float b2) {
    if (opt == OPT_SGD) {
        for (long long j = 0; j < dim; j++) delta[j] -= lr * g[j];
    } else if (opt == OPT_ADAGRAD) {
        float sq = 0.0f;
        for (long long j = 0; j < dim; j++) sq += g[j] * g[j];
        const float g2 = state[0] + sq / (float)dim;
        state[0] = g2;
        const float denom = sqrtf(g2) + eps;
        for (long long j = 0; j < dim; j++) delta[j] -= lr * g[j] / denom;
    } else { /* partial row-wise Adam: state = [m (dim) | v | t] */
        float *m = state, *v = state + dim, *t = state + dim + 1;
        float sq = 0.0f;
        for (long long j = 0; j < dim; j++) sq += g[j] * g[j];
        *v = b2 * *v + (1.0f - b2) * (sq / (float)dim);
        *t = *t + 1.0f;
        const float c1 = 1.0f - powf(b1, *t), c2 = 1.0f - powf(b2, *t);
        const float denom = sqrtf(*v / c2) + eps;
        for (long long j = 0; j < dim; j++) {
            m[j] = b1 * m[j] + (1.0f - b1) * g[j];
            delta[j] -= lr * (m[j] / c1) / denom;
        }
    }
}

static PyObject *apply_rows(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, base_p, row_p, slots_p, fresh_p, grads_p;
    long long capacity, dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    if (!PyArg_ParseTuple(args, "iKKKKLLLKKKLdddd", &opt, &delta_p, &state_p, &base_p, &row_p,
                          &capacity, &dim, &width, &slots_p, &fresh_p, &grads_p, &n, &lr, &eps,
                          &b1, &b2)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p, *base = (float *)base_p;
    float *row = (float *)row_p;
    const int64_t *slots = (const int64_t *)slots_p;
    const uint8_t *fresh = (const uint8_t *)fresh_p;
    const float *grads = (const float *)grads_p;
    long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        const int64_t s = slots[i];
        if (s < 0 || s >= capacity) { bad = 1; break; }
        float *d = delta + s * dim, *b = base + s * dim, *r = row + s * dim;
        float *st = state + s * width;
        if (fresh[i]) {
            memcpy(b, r, sizeof(float) * dim);
            memset(d, 0, sizeof(float) * dim);
            if (width) memset(st, 0, sizeof(float) * width);
        }
        opt_step(opt, d, st, grads + i * dim, dim, (float)lr, (float)eps, (float)b1, (float)b2);
        for (long long j = 0; j < dim; j++) r[j] = b[j] + d[j];
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "apply_rows: a slot is out of the cache");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The same optimizer math on compact host arrays (rows not in the cache): delta [n, dim] and
 * state [n, width] updated in place. Shares opt_step, so both paths give the same bits. */
static PyObject *step_rows(PyObject *self, PyObject *args) {
    unsigned long long delta_p, state_p, grads_p;
    long long dim, width, n;
    int opt;
    double lr, eps, b1, b2;
    if (!PyArg_ParseTuple(args, "iKKKLLLdddd", &opt, &delta_p, &state_p, &grads_p, &dim,
                          &width, &n, &lr, &eps, &b1, &b2)) {
        return NULL;
    }
    float *delta = (float *)delta_p, *state = (float *)state_p;
    const float *grads = (const float *)grads_p;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < n; i++) {
        opt_step(opt, delta + i * dim, state + i * width, grads + i * dim, dim, (float)lr,
                 (float)eps, (float)b1, (float)b2);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"cuckoo_find", cuckoo_find, METH_VARARGS, "Cuckoo lookup of ids: slots, hit flags."},
    {"peer_forward", peer_forward, METH_VARARGS, "PEER forward over rows by index."},
    {"peer_backward", peer_backward, METH_VARARGS, "PEER backward: dx, dgates, row grads."},
    {"apply_rows", apply_rows, METH_VARARGS, "Row optimizer step on cache columns."},
    {"step_rows", step_rows, METH_VARARGS, "Row optimizer step on compact arrays."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
