/* molnets' optional compiled CPU kernels (private; loaded by molnets/_native.py, which compiles
 * this file at first use and falls back to the PyTorch operations when it cannot).
 *
 * Every kernel reads and writes contiguous arrays of one precision (float or double) whose
 * innermost axis is the C channels, so that every inner loop runs along contiguous channels
 * and vectorizes. Threads split the channels (pair convolution: no two threads write the same
 * number), the edges or the atoms (product basis), from GRAIN numbers of work on. Indices are
 * checked before any number is written: a kernel returns 0, or 1 when an index is out of range
 * (nothing written).
 *
 * Pair convolution (molnets.layers.pairs.pair_convolution; w_p spread over the rows of its part):
 *
 *     out[i_p, r] += w[p, part(r)] * x[j_p, r],   out[j_p, r] += w[p, part(r)] * x[i_p, r]
 *
 * and its backward from g = dL/dout: dx is the same convolution of g, and
 *
 *     dw[p, k] = sum over the rows r of part k of g[i_p, r] * x[j_p, r] + g[j_p, r] * x[i_p, r].
 *
 * Scatter of outer products (molnets.layers.scatter.scatter_outer; u_e spread over the rows, w_e
 * over the parts):
 *
 *     out[index_e, r] += u[e, r] * w[e, part(r)]
 *
 * and its backward from g (G_e = g[index_e]): du[e, r] = sum_c G_e[r] * w[e, part(r)],
 * dw[e, k] = sum over the rows r of part k of u[e, r] * G_e[r].
 *
 * 3x3 products of stacks of L matrices stored entry-major (molnets.models._tensornet_ops: entry
 * (a, b) of all L matrices in one row of L numbers, rows 3 a + b apart by a row stride, or
 * 3 b + a for a transposed operand):
 *
 *     out = plus + P Q (+ Q P where symmetric),   plus optional (NULL), possibly out itself.
 *
 * Product basis (molnets.ace.ProductBasis), as a list of terms t with factors a_t1 .. a_tF (an
 * index M stands for the number 1: lower degrees padded to F factors), an output component o_t
 * and per species s and channel c a coefficient F[s, t, c] (the weights folded into the
 * symmetrized coupling):
 *
 *     B[n, c, o] = sum over terms t with o_t = o of F[s_n, t, c] * prod_f A[n, c, a_tf]
 *
 * written at out[n, offset[o] + c * stride[o]] (e3nn's channel-major layout of each irrep), and
 * its backward dA[n, c, a] = sum over terms and factors f with a_tf = a of
 * g[n, c, o_t] F[s_n, t, c] prod_(f' != f) A[n, c, a_tf'].
 */

#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define NUM_THREADS omp_get_num_threads()
#else
#define THREAD_ID 0
#define NUM_THREADS 1
#endif

#define RESTRICT __restrict__

/* a kernel runs on one thread below this many numbers of work (PyTorch's own grain size): a
 * second thread's wake-up costs more than it saves on a small molecule's arrays */
#define GRAIN 32768

static int out_of_range(const int64_t *index, int64_t count, int64_t size) {
    for (int64_t k = 0; k < count; ++k)
        if (index[k] < 0 || index[k] >= size) return 1;
    return 0;
}

static int pairs_out_of_range(const int64_t *part, const int64_t *pair_i, const int64_t *pair_j, int64_t N,
                              int64_t P, int64_t R, int64_t K) {
    return out_of_range(pair_i, P, N) || out_of_range(pair_j, P, N) || out_of_range(part, R, K);
}

#define KERNELS(T, SUFFIX)                                                                          \
                                                                                                    \
static inline void add_product_##SUFFIX(T *RESTRICT out, const T *RESTRICT a, const T *RESTRICT b,  \
                                        int64_t c0, int64_t c1) {                                   \
    for (int64_t c = c0; c < c1; ++c) out[c] += a[c] * b[c];                                        \
}                                                                                                   \
                                                                                                    \
static inline void add_two_products_##SUFFIX(T *RESTRICT out, const T *RESTRICT a, const T *RESTRICT b, \
                                             const T *RESTRICT d, const T *RESTRICT e,              \
                                             int64_t c0, int64_t c1) {                              \
    for (int64_t c = c0; c < c1; ++c) out[c] += a[c] * b[c] + d[c] * e[c];                          \
}                                                                                                   \
                                                                                                    \
static inline void add_scaled_##SUFFIX(T *RESTRICT out, T a, const T *RESTRICT b, int64_t c0,       \
                                       int64_t c1) {                                                \
    for (int64_t c = c0; c < c1; ++c) out[c] += a * b[c];                                           \
}                                                                                                   \
                                                                                                    \
static inline T dot_##SUFFIX(const T *RESTRICT a, const T *RESTRICT b, int64_t C) {                 \
    T sum = 0;                                                                                      \
    _Pragma("omp simd reduction(+: sum)")                                                           \
    for (int64_t c = 0; c < C; ++c) sum += a[c] * b[c];                                             \
    return sum;                                                                                     \
}                                                                                                   \
                                                                                                    \
int pair_convolution_forward_##SUFFIX(T *out, const T *x, const T *w, const int64_t *part,          \
                                      const int64_t *pair_i, const int64_t *pair_j, int64_t N,      \
                                      int64_t P, int64_t R, int64_t K, int64_t C, int threads) {    \
    if (pairs_out_of_range(part, pair_i, pair_j, N, P, R, K)) return 1;                             \
    _Pragma("omp parallel num_threads(threads) if (P * R * C >= GRAIN)") \
    {                                                                                               \
        const int64_t c0 = C * THREAD_ID / NUM_THREADS, c1 = C * (THREAD_ID + 1) / NUM_THREADS;     \
        for (int64_t p = 0; p < P; ++p) {                                                           \
            const int64_t i = pair_i[p] * R * C, j = pair_j[p] * R * C;                             \
            for (int64_t r = 0; r < R; ++r) {                                                       \
                const T *wr = w + (p * K + part[r]) * C;                                            \
                add_product_##SUFFIX(out + i + r * C, wr, x + j + r * C, c0, c1);                   \
                add_product_##SUFFIX(out + j + r * C, wr, x + i + r * C, c0, c1);                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
int pair_convolution_backward_##SUFFIX(T *grad_x, T *grad_w, const T *grad, const T *x, const T *w, \
                                       const int64_t *part, const int64_t *pair_i,                  \
                                       const int64_t *pair_j, int64_t N, int64_t P, int64_t R,      \
                                       int64_t K, int64_t C, int threads) {                         \
    if (pairs_out_of_range(part, pair_i, pair_j, N, P, R, K)) return 1;                             \
    _Pragma("omp parallel num_threads(threads) if (P * R * C >= GRAIN)") \
    {                                                                                               \
        const int64_t c0 = C * THREAD_ID / NUM_THREADS, c1 = C * (THREAD_ID + 1) / NUM_THREADS;     \
        for (int64_t p = 0; p < P; ++p) {                                                           \
            const int64_t i = pair_i[p] * R * C, j = pair_j[p] * R * C;                             \
            T *grad_wp = grad_w + p * K * C;                                                        \
            if (grad_w != NULL)                                                                     \
                for (int64_t k = 0; k < K; ++k)                                                     \
                    for (int64_t c = c0; c < c1; ++c) grad_wp[k * C + c] = 0;                       \
            for (int64_t r = 0; r < R; ++r) {                                                       \
                const T *wr = w + (p * K + part[r]) * C;                                            \
                const T *gi = grad + i + r * C, *gj = grad + j + r * C;                             \
                if (grad_w != NULL)                                                                 \
                    add_two_products_##SUFFIX(grad_wp + part[r] * C, gi, x + j + r * C, gj,         \
                                              x + i + r * C, c0, c1);                               \
                if (grad_x != NULL) {                                                               \
                    add_product_##SUFFIX(grad_x + i + r * C, wr, gj, c0, c1);                       \
                    add_product_##SUFFIX(grad_x + j + r * C, wr, gi, c0, c1);                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
int scatter_outer_forward_##SUFFIX(T *out, const T *u, const T *w, const int64_t *part,             \
                                   const int64_t *index, int64_t N, int64_t E, int64_t R, int64_t K, \
                                   int64_t C, int threads) {                                        \
    if (out_of_range(index, E, N) || out_of_range(part, R, K)) return 1;                            \
    _Pragma("omp parallel num_threads(threads) if (E * R * C >= GRAIN)") \
    {                                                                                               \
        const int64_t c0 = C * THREAD_ID / NUM_THREADS, c1 = C * (THREAD_ID + 1) / NUM_THREADS;     \
        for (int64_t e = 0; e < E; ++e) {                                                           \
            T *out_e = out + index[e] * R * C;                                                      \
            for (int64_t r = 0; r < R; ++r)                                                         \
                add_scaled_##SUFFIX(out_e + r * C, u[e * R + r], w + (e * K + part[r]) * C, c0, c1); \
        }                                                                                           \
    }                                                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
int scatter_outer_backward_##SUFFIX(T *grad_u, T *grad_w, const T *grad, const T *u, const T *w,    \
                                    const int64_t *part, const int64_t *index, int64_t N,           \
                                    int64_t E, int64_t R, int64_t K, int64_t C, int threads) {      \
    if (out_of_range(index, E, N) || out_of_range(part, R, K)) return 1;                            \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (E * R * C >= GRAIN)") \
    for (int64_t e = 0; e < E; ++e) {                                                               \
        const T *G = grad + index[e] * R * C;                                                       \
        T *grad_we = grad_w + e * K * C;                                                            \
        if (grad_w != NULL)                                                                         \
            for (int64_t k = 0; k < K * C; ++k) grad_we[k] = 0;                                     \
        for (int64_t r = 0; r < R; ++r) {                                                           \
            const T *wr = w + (e * K + part[r]) * C;                                                \
            if (grad_u != NULL) grad_u[e * R + r] = dot_##SUFFIX(G + r * C, wr, C);                 \
            if (grad_w != NULL) add_scaled_##SUFFIX(grad_we + part[r] * C, u[e * R + r], G + r * C, 0, C); \
        }                                                                                           \
    }                                                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
int matrix_products_##SUFFIX(T *out, const T *P, const T *Q, const T *plus, int64_t out_row, \
                             int64_t p_row, int64_t q_row, int64_t plus_row, int64_t p_transposed,  \
                             int64_t q_transposed, int64_t symmetric, int64_t L, int threads) {     \
    int64_t p_at[9], q_at[9];  /* where entry (a, b) of P and Q starts */                          \
    for (int64_t a = 0; a < 3; ++a)                                                                 \
        for (int64_t b = 0; b < 3; ++b) {                                                           \
            p_at[3 * a + b] = (p_transposed ? 3 * b + a : 3 * a + b) * p_row;                       \
            q_at[3 * a + b] = (q_transposed ? 3 * b + a : 3 * a + b) * q_row;                       \
        }                                                                                           \
    const int64_t block = 256;                                                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (9 * L >= GRAIN)")          \
    for (int64_t l0 = 0; l0 < L; l0 += block) {                                                     \
        const int64_t n = L - l0 < block ? L - l0 : block;                                          \
        T acc[256];                                                                                 \
        for (int64_t a = 0; a < 3; ++a)                                                             \
            for (int64_t b = 0; b < 3; ++b) {                                                       \
                for (int64_t l = 0; l < n; ++l) acc[l] = 0;                                         \
                for (int64_t k = 0; k < 3; ++k) {                                                   \
                    add_product_##SUFFIX(acc, P + p_at[3 * a + k] + l0, Q + q_at[3 * k + b] + l0, 0, n); \
                    if (symmetric)                                                                  \
                        add_product_##SUFFIX(acc, Q + q_at[3 * a + k] + l0, P + p_at[3 * k + b] + l0, 0, n); \
                }                                                                                   \
                T *o = out + (3 * a + b) * out_row + l0;                                            \
                if (plus != NULL) {                                                                 \
                    const T *s = plus + (3 * a + b) * plus_row + l0;                                \
                    for (int64_t l = 0; l < n; ++l) o[l] = s[l] + acc[l];                           \
                } else {                                                                            \
                    for (int64_t l = 0; l < n; ++l) o[l] = acc[l];                                  \
                }                                                                                   \
            }                                                                                       \
    }                                                                                               \
    return 0;                                                                                       \
}                                                                                                   \
                                                                                                    \
/* out += the product of 1 to 5 rows of C channels (out never one of them) */                     \
static inline void add1_##SUFFIX(T *RESTRICT o, const T *RESTRICT a, int64_t C) {                   \
    for (int64_t c = 0; c < C; ++c) o[c] += a[c];                                                   \
}                                                                                                   \
static inline void add2_##SUFFIX(T *RESTRICT o, const T *RESTRICT a, const T *RESTRICT b, int64_t C) { \
    for (int64_t c = 0; c < C; ++c) o[c] += a[c] * b[c];                                            \
}                                                                                                   \
static inline void add3_##SUFFIX(T *RESTRICT o, const T *RESTRICT a, const T *RESTRICT b,           \
                                 const T *RESTRICT d, int64_t C) {                                  \
    for (int64_t c = 0; c < C; ++c) o[c] += a[c] * b[c] * d[c];                                     \
}                                                                                                   \
static inline void add4_##SUFFIX(T *RESTRICT o, const T *RESTRICT a, const T *RESTRICT b,           \
                                 const T *RESTRICT d, const T *RESTRICT e, int64_t C) {             \
    for (int64_t c = 0; c < C; ++c) o[c] += a[c] * b[c] * d[c] * e[c];                              \
}                                                                                                   \
static inline void add5_##SUFFIX(T *RESTRICT o, const T *RESTRICT a, const T *RESTRICT b,           \
                                 const T *RESTRICT d, const T *RESTRICT e, const T *RESTRICT f,     \
                                 int64_t C) {                                                       \
    for (int64_t c = 0; c < C; ++c) o[c] += a[c] * b[c] * d[c] * e[c] * f[c];                       \
}                                                                                                   \
                                                                                                    \
/* out += coef * the product of one term's F factors (rows of x [M + 1, C]) */                     \
static inline void term_##SUFFIX(T *out, const T *coef, const T *x, const int64_t *factor, int64_t F, \
                                 int64_t C) {                                                       \
    const T *a = x + factor[0] * C, *b = x + factor[F > 1] * C, *d = x + factor[F > 2 ? 2 : 0] * C; \
    if (F == 1) add2_##SUFFIX(out, coef, a, C);                                                     \
    else if (F == 2) add3_##SUFFIX(out, coef, a, b, C);                                             \
    else if (F == 3) add4_##SUFFIX(out, coef, a, b, d, C);                                          \
    else add5_##SUFFIX(out, coef, a, b, d, x + factor[3] * C, C);                                   \
}                                                                                                   \
                                                                                                    \
/* gx[factor f] += q * the product of the term's other factors, for each of its F factors */       \
static inline void term_backward_##SUFFIX(T *gx, const T *q, const T *x, const int64_t *factor,     \
                                          int64_t F, int64_t C) {                                   \
    const T *a = x + factor[0] * C, *b = x + factor[F > 1] * C, *d = x + factor[F > 2 ? 2 : 0] * C; \
    T *ga = gx + factor[0] * C, *gb = gx + factor[F > 1] * C, *gd = gx + factor[F > 2 ? 2 : 0] * C; \
    if (F == 1) {                                                                                   \
        add1_##SUFFIX(ga, q, C);                                                                    \
    } else if (F == 2) {                                                                            \
        add2_##SUFFIX(ga, q, b, C);                                                                 \
        add2_##SUFFIX(gb, q, a, C);                                                                 \
    } else if (F == 3) {                                                                            \
        add3_##SUFFIX(ga, q, b, d, C);                                                              \
        add3_##SUFFIX(gb, q, a, d, C);                                                              \
        add3_##SUFFIX(gd, q, a, b, C);                                                              \
    } else {                                                                                        \
        const T *e = x + factor[3] * C;                                                             \
        add4_##SUFFIX(ga, q, b, d, e, C);                                                           \
        add4_##SUFFIX(gb, q, a, d, e, C);                                                           \
        add4_##SUFFIX(gd, q, a, b, e, C);                                                           \
        add4_##SUFFIX(gx + factor[3] * C, q, a, b, d, C);                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* A[n] [C, M] -> x [M + 1, C], the last row ones (the padding factor) */                          \
static inline void channels_last_##SUFFIX(T *RESTRICT x, const T *RESTRICT A, int64_t M, int64_t C) { \
    for (int64_t c = 0; c < C; ++c)                                                                 \
        for (int64_t m = 0; m < M; ++m) x[m * C + c] = A[c * M + m];                                \
    for (int64_t c = 0; c < C; ++c) x[M * C + c] = 1;                                               \
}                                                                                                   \
                                                                                                    \
static int product_basis_checks_##SUFFIX(const int64_t *species, const int64_t *factors,            \
                                         const int64_t *component, int64_t N, int64_t M, int64_t O, \
                                         int64_t S, int64_t terms, int64_t F) {                     \
    return F < 1 || F > 4 || out_of_range(species, N, S) || out_of_range(factors, terms * F, M + 1) \
           || out_of_range(component, terms, O);                                                    \
}                                                                                                   \
                                                                                                    \
int product_basis_forward_##SUFFIX(T *out, const T *A, const int64_t *species, const T *coef,       \
                                   const int64_t *factors, const int64_t *component,                \
                                   const int64_t *offset, const int64_t *stride, int64_t N,         \
                                   int64_t C, int64_t M, int64_t O, int64_t S, int64_t terms,       \
                                   int64_t F, int threads) {                                        \
    if (product_basis_checks_##SUFFIX(species, factors, component, N, M, O, S, terms, F)) return 1; \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads) reduction(|: failed) if (N * terms * C >= GRAIN)") \
    {                                                                                               \
        T *x = malloc(sizeof(T) * (M + 1 + O) * C), *acc = x + (M + 1) * C;                         \
        failed |= x == NULL;                                                                        \
        {                                                                                           \
            _Pragma("omp for schedule(static)")                                                     \
            for (int64_t n = 0; n < N; ++n) {                                                       \
                if (x == NULL) continue;                                                            \
                channels_last_##SUFFIX(x, A + n * C * M, M, C);                                     \
                for (int64_t k = 0; k < O * C; ++k) acc[k] = 0;                                     \
                const T *coef_s = coef + species[n] * terms * C;                                    \
                for (int64_t t = 0; t < terms; ++t)                                                 \
                    term_##SUFFIX(acc + component[t] * C, coef_s + t * C, x, factors + t * F, F, C); \
                T *out_n = out + n * C * O;                                                         \
                for (int64_t o = 0; o < O; ++o)                                                     \
                    for (int64_t c = 0; c < C; ++c) out_n[offset[o] + c * stride[o]] = acc[o * C + c]; \
            }                                                                                       \
            free(x);                                                                                \
        }                                                                                           \
    }                                                                                               \
    return failed ? 2 : 0;                                                                          \
}                                                                                                   \
                                                                                                    \
int product_basis_backward_##SUFFIX(T *grad_A, const T *grad, const T *A, const int64_t *species,   \
                                    const T *coef, const int64_t *factors,                          \
                                    const int64_t *component, const int64_t *offset,                \
                                    const int64_t *stride, int64_t N, int64_t C, int64_t M,         \
                                    int64_t O, int64_t S, int64_t terms, int64_t F, int threads) {  \
    if (product_basis_checks_##SUFFIX(species, factors, component, N, M, O, S, terms, F)) return 1; \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads) reduction(|: failed) if (N * terms * C >= GRAIN)") \
    {                                                                                               \
        T *x = malloc(sizeof(T) * (2 * (M + 1) + O + 1) * C);                                       \
        failed |= x == NULL;                                                                        \
        {                                                                                           \
            T *gx = x + (M + 1) * C, *g = gx + (M + 1) * C, *q = g + O * C;                         \
            _Pragma("omp for schedule(static)")                                                     \
            for (int64_t n = 0; n < N; ++n) {                                                       \
                if (x == NULL) continue;                                                            \
                channels_last_##SUFFIX(x, A + n * C * M, M, C);                                     \
                for (int64_t k = 0; k < (M + 1) * C; ++k) gx[k] = 0;                                \
                const T *grad_n = grad + n * C * O;                                                 \
                for (int64_t o = 0; o < O; ++o)                                                     \
                    for (int64_t c = 0; c < C; ++c) g[o * C + c] = grad_n[offset[o] + c * stride[o]]; \
                const T *coef_s = coef + species[n] * terms * C;                                    \
                for (int64_t t = 0; t < terms; ++t) {                                               \
                    const T *coef_t = coef_s + t * C, *g_t = g + component[t] * C;                  \
                    for (int64_t c = 0; c < C; ++c) q[c] = g_t[c] * coef_t[c];                      \
                    term_backward_##SUFFIX(gx, q, x, factors + t * F, F, C);                        \
                }                                                                                   \
                T *grad_n_A = grad_A + n * C * M;                                                   \
                for (int64_t c = 0; c < C; ++c)                                                     \
                    for (int64_t m = 0; m < M; ++m) grad_n_A[c * M + m] = gx[m * C + c];            \
            }                                                                                       \
            free(x);                                                                                \
        }                                                                                           \
    }                                                                                               \
    return failed ? 2 : 0;                                                                          \
}

KERNELS(float, f32)
KERNELS(double, f64)
