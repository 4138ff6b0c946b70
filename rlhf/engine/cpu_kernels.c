/* Fused CPU kernels for the elementwise chains of rlhf.engine.lean_llama's training forward.

   Between its matmuls, a Llama layer under bf16 autocast makes many passes over its activations: the RMS
   norm's square, mean, scale and cast, the rotation's products, roll and casts, SwiGLU's SiLU and product,
   and more in their backwards. On a CPU each pass streams a tensor of megabytes through memory, so together
   they cost more than the matmuls. Each function here does one chain in one pass over its inputs, in fp32,
   rounding once to bf16 (round to nearest even, as torch does).

   Tensors are contiguous and row-major; bf16 travels as uint16_t. Built and loaded by
   rlhf/engine/cpu_kernels.py; `threads` is torch's intra-op thread count. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* exp(x) to about 1 ulp (Cephes' expf: 2^n times a polynomial on [-ln2/2, ln2/2]), written so that the compiler
   vectorizes it; libm's expf is a call the loops cannot vectorize. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* fminf/fmaxf would keep the loops scalar */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* y = bf16(x * rstd * w), rstd = 1 / sqrt(mean(x^2) + eps) per row of d; x (n, d) fp32. */
void rms_norm_fwd(const float *x, const float *w, int64_t n, int64_t d, float eps, bf16 *y, float *rstd,
                  int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;
        bf16 *yi = y + i * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) yi[j] = f32_to_bf16(xi[j] * r * w[j]);
    }
}

/* Backward of rms_norm_fwd for an incoming gradient gy (n, d) bf16:
   gx = r gy w - x r^3 / d * sum(gy w x), written to gx (n, d) fp32;
   the weight's gradient sum_i(gy x r) accumulated per thread into gw_parts (threads, d), zeroed by the caller. */
void rms_norm_bwd(const float *x, const float *w, const float *rstd, const bf16 *gy, int64_t n, int64_t d,
                  float *gx, float *gw_parts, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *gw = gw_parts + (int64_t)thread_id() * d;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *xi = x + i * d;
            const bf16 *gi = gy + i * d;
            float *gxi = gx + i * d;
            float r = rstd[i], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < d; j++) dot += bf16_to_f32(gi[j]) * w[j] * xi[j];
            float c = dot * r * r * r / (float)d;
#pragma omp simd
            for (int64_t j = 0; j < d; j++) {
                float g = bf16_to_f32(gi[j]);
                gxi[j] = r * g * w[j] - c * xi[j];
                gw[j] += g * xi[j] * r;
            }
        }
    }
}

/* One head's vector x (D) rotated: out = x cos + roll(x, D/2) sin, sin's first half negated by the caller. */
static inline void rotate_head(const bf16 *x, const float *cos, const float *sin, int64_t D, bf16 *out) {
    int64_t half = D / 2;
#pragma omp simd
    for (int64_t j = 0; j < half; j++)
        out[j] = f32_to_bf16(bf16_to_f32(x[j]) * cos[j] + bf16_to_f32(x[j + half]) * sin[j]);
#pragma omp simd
    for (int64_t j = half; j < D; j++)
        out[j] = f32_to_bf16(bf16_to_f32(x[j]) * cos[j] + bf16_to_f32(x[j - half]) * sin[j]);
}

/* Its backward: gx_m = g_m cos_m + g_m' sin_m', m' = (m + D/2) mod D. */
static inline void unrotate_head(const bf16 *g, const float *cos, const float *sin, int64_t D, bf16 *out) {
    int64_t half = D / 2;
#pragma omp simd
    for (int64_t j = 0; j < half; j++)
        out[j] = f32_to_bf16(bf16_to_f32(g[j]) * cos[j] + bf16_to_f32(g[j + half]) * sin[j + half]);
#pragma omp simd
    for (int64_t j = half; j < D; j++)
        out[j] = f32_to_bf16(bf16_to_f32(g[j]) * cos[j] + bf16_to_f32(g[j - half]) * sin[j - half]);
}

/* The fused QKV projection (R, W, H + 2 Hkv, D) split into queries (R, H, W, D), keys and values
   (R, Hkv, W, D), queries and keys rotated with the token's cos and sin (R, W, D) fp32. */
void rotary_split_fwd(const bf16 *qkv, const float *cos, const float *sin, int64_t rows, int64_t width,
                      int64_t H, int64_t Hkv, int64_t D, bf16 *q, bf16 *k, bf16 *v, int threads) {
    int64_t heads = H + 2 * Hkv;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t t = 0; t < rows * width; t++) {
        int64_t r = t / width, p = t % width;
        const float *c = cos + t * D, *s = sin + t * D;
        const bf16 *src = qkv + t * heads * D;
        for (int64_t h = 0; h < H; h++) rotate_head(src + h * D, c, s, D, q + ((r * H + h) * width + p) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            rotate_head(src + (H + h) * D, c, s, D, k + ((r * Hkv + h) * width + p) * D);
            memcpy(v + ((r * Hkv + h) * width + p) * D, src + (H + Hkv + h) * D, (size_t)D * sizeof(bf16));
        }
    }
}

/* Backward of rotary_split_fwd: the gradients of q, k, v gathered back into the QKV layout. */
void rotary_split_bwd(const bf16 *gq, const bf16 *gk, const bf16 *gv, const float *cos, const float *sin,
                      int64_t rows, int64_t width, int64_t H, int64_t Hkv, int64_t D, bf16 *gqkv, int threads) {
    int64_t heads = H + 2 * Hkv;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t t = 0; t < rows * width; t++) {
        int64_t r = t / width, p = t % width;
        const float *c = cos + t * D, *s = sin + t * D;
        bf16 *dst = gqkv + t * heads * D;
        for (int64_t h = 0; h < H; h++) unrotate_head(gq + ((r * H + h) * width + p) * D, c, s, D, dst + h * D);
        for (int64_t h = 0; h < Hkv; h++) {
            unrotate_head(gk + ((r * Hkv + h) * width + p) * D, c, s, D, dst + (H + h) * D);
            memcpy(dst + (H + Hkv + h) * D, gv + ((r * Hkv + h) * width + p) * D, (size_t)D * sizeof(bf16));
        }
    }
}

/* SwiGLU: y = silu(gate) * up, gate and up the two halves of each row of gu (n, 2 I); y (n, I). */
void swiglu_fwd(const bf16 *gu, int64_t n, int64_t I, bf16 *y, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const bf16 *g = gu + i * 2 * I, *u = g + I;
        bf16 *yi = y + i * I;
#pragma omp simd
        for (int64_t j = 0; j < I; j++) {
            float a = bf16_to_f32(g[j]);
            float s = 1.0f / (1.0f + exp_f32(-a));
            yi[j] = f32_to_bf16(a * s * bf16_to_f32(u[j]));
        }
    }
}

/* Its backward for gy (n, I): d gate = gy up s (1 + a (1 - s)), d up = gy a s, s = sigmoid(a); into ggu (n, 2 I). */
void swiglu_bwd(const bf16 *gu, const bf16 *gy, int64_t n, int64_t I, bf16 *ggu, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const bf16 *g = gu + i * 2 * I, *u = g + I, *gyi = gy + i * I;
        bf16 *dg = ggu + i * 2 * I, *du = dg + I;
#pragma omp simd
        for (int64_t j = 0; j < I; j++) {
            float a = bf16_to_f32(g[j]), b = bf16_to_f32(u[j]), e = bf16_to_f32(gyi[j]);
            float s = 1.0f / (1.0f + exp_f32(-a));
            dg[j] = f32_to_bf16(e * b * s * (1.0f + a * (1.0f - s)));
            du[j] = f32_to_bf16(e * a * s);
        }
    }
}

/* Attention of new tokens over a KV cache, for decoding (no backward): queries q (B, Hkv, G, S, D), the G query
   heads that share a KV head stacked, S new tokens each; keys and values (B, Hkv, L, D); allowed (B, S, L), 1 =
   attend. Per query: scores in fp32, softmax, then the weighted sum of the values, rounded once into out, laid
   out as q. Masked slots are skipped, never read. A batched matmul of one query row runs far below the memory
   bandwidth that reading the cache needs; this streams each key and value row once per query. */
void cached_attention(const bf16 *q, const bf16 *keys, const bf16 *values, const uint8_t *allowed, int64_t B,
                      int64_t Hkv, int64_t G, int64_t S, int64_t L, int64_t D, float scale, bf16 *out,
                      int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        int64_t b = bh / Hkv;
        const bf16 *K = keys + bh * L * D, *V = values + bh * L * D;
        float scores[L], acc[D], qf[D];
        for (int64_t r = 0; r < G * S; r++) {
            int64_t s = r % S;
            const uint8_t *ok = allowed + (b * S + s) * L;
            const bf16 *qr = q + (bh * G * S + r) * D;
#pragma omp simd
            for (int64_t j = 0; j < D; j++) qf[j] = bf16_to_f32(qr[j]) * scale;
            float top = -INFINITY;
            for (int64_t l = 0; l < L; l++) {
                if (!ok[l]) continue;
                const bf16 *k = K + l * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t j = 0; j < D; j++) dot += qf[j] * bf16_to_f32(k[j]);
                scores[l] = dot;
                top = dot > top ? dot : top;
            }
            for (int64_t j = 0; j < D; j++) acc[j] = 0.0f;
            float total = 0.0f;
            for (int64_t l = 0; l < L; l++) {
                if (!ok[l]) continue;
                float p = exp_f32(scores[l] - top);
                total += p;
                const bf16 *v = V + l * D;
#pragma omp simd
                for (int64_t j = 0; j < D; j++) acc[j] += p * bf16_to_f32(v[j]);
            }
            bf16 *o = out + (bh * G * S + r) * D;
            float inv = total > 0.0f ? 1.0f / total : 0.0f; /* a query that sees nothing gets zeros */
#pragma omp simd
            for (int64_t j = 0; j < D; j++) o[j] = f32_to_bf16(acc[j] * inv);
        }
    }
}
