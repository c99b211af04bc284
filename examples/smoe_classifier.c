/* smoe_classifier — your own model on flexmoe's SMoE layer: a one-token-per-sample classifier,
 * logits = (h + SMoE(h)) W_out with h = x W_in, trained with plain SGD on a synthetic task of
 * 4 classes in 20 features. The two small Linear layers are ordinary loops; the layer (gate,
 * routing, experts, combine, and the gate loss's gradient) is one call each way. */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { N = 512, F = 20, D = 32, C = 4, E = 8, BATCH = 64, STEPS = 300 };

static float frand(void) { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }

/* y (rows x out) = x (rows x in) . w (in x out), and its backward: dx (optional) and dw. */
static void linear(int rows, int in, int out, const float *x, const float *w, float *y) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < out; j++) {
            float s = 0.0f;
            for (int k = 0; k < in; k++) s += x[r * in + k] * w[k * out + j];
            y[r * out + j] = s;
        }
}
static void linear_backward(int rows, int in, int out, const float *x, const float *w, const float *dy, float *dx, float *dw) {
    for (int k = 0; k < in * out; k++) dw[k] = 0.0f;
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < in; k++) {
            float s = 0.0f;
            for (int j = 0; j < out; j++) s += dy[r * out + j] * w[k * out + j], dw[k * out + j] += x[r * in + k] * dy[r * out + j];
            if (dx) dx[r * in + k] = s;
        }
}

int main(void) {
    static float x[N * F], w_in[F * D], w_out[D * C], centre[C][F];
    static float h[BATCH * D], y[BATCH * D], logits[BATCH * C], dlogits[BATCH * C], dy[BATCH * D], dh[BATCH * D];
    static float g_in[F * D], g_out[D * C];
    static int32_t label[N];
    fm_moe_desc desc = {0};
    fm_moe_sizes sizes;
    desc.dim = D, desc.hidden = 2 * D, desc.experts = E, desc.top_k = 2; /* Flex-MoE's noisy gate */
    fm_moe_buffer_sizes(&desc, BATCH, &sizes);
    void *saved = fm_alloc(sizes.saved_bytes), *workspace = fm_alloc(sizes.workspace_bytes);
    const size_t w1n = E * fm_packed_weight_floats(D, 2 * D), w2n = E * fm_packed_weight_floats(2 * D, D);
    float *plain1 = malloc(sizeof(float) * E * D * 2 * D), *plain2 = malloc(sizeof(float) * E * 2 * D * D);
    float *p[6], *g[6];
    const size_t count[6] = {D * E, D * E, w1n, E * 2 * D, w2n, E * D}; /* w_gate w_noise w1 b1 w2 b2 */
    for (int i = 0; i < 6; i++) p[i] = fm_alloc(count[i] * sizeof(float)), g[i] = fm_alloc(count[i] * sizeof(float));
    if (!saved || !workspace || !plain1 || !plain2) return 1;
    srand(1);
    for (int i = 0; i < D * E; i++) p[0][i] = 0.1f * frand(), p[1][i] = 0.1f * frand();
    for (int i = 0; i < E * D * 2 * D; i++) plain1[i] = frand() / 6.0f, plain2[i] = frand() / 8.0f;
    fm_pack_weights(E, D, 2 * D, FM_WEIGHTS_IN_BY_OUT, plain1, 2 * D, p[2]);
    fm_pack_weights(E, 2 * D, D, FM_WEIGHTS_IN_BY_OUT, plain2, D, p[4]);
    for (size_t i = 0; i < count[3]; i++) p[3][i] = 0.0f;
    for (size_t i = 0; i < count[5]; i++) p[5][i] = 0.0f;
    for (int i = 0; i < F * D; i++) w_in[i] = frand() / 4.0f;
    for (int i = 0; i < D * C; i++) w_out[i] = frand() / 6.0f;
    for (int c = 0; c < C; c++)
        for (int k = 0; k < F; k++) centre[c][k] = frand();
    for (int n = 0; n < N; n++)
        for (int k = 0; k < F; k++) label[n] = n % C, x[n * F + k] = centre[n % C][k] + 0.7f * frand();

    fm_moe_params params = {p[0], p[1], p[2], p[3], p[4], p[5], {0}};
    fm_moe_grads grads = {g[0], g[1], g[2], g[3], g[4], g[5], {0}};
    fm_moe_loss_weights weights = {0.01f, 0.0f, 0.0f, NULL};
    for (int step = 0; step < STEPS; step++) {
        const int first = step * BATCH % N;
        fm_moe_batch batch = {0};
        fm_moe_stats stats = {0};
        int32_t rows[E], busiest = 0;
        stats.expert_rows = rows;
        float loss = 0.0f;
        linear(BATCH, F, D, x + first * F, w_in, h);
        batch.tokens = BATCH, batch.x = h, batch.training = 1, batch.seed = 7, batch.token_offset = (uint64_t)step * BATCH;
        if (fm_moe_forward(&desc, &params, &batch, y, 0, saved, workspace, &stats) != FM_OK) return 1;
        for (int i = 0; i < BATCH * D; i++) y[i] += h[i]; /* the residual */
        linear(BATCH, D, C, y, w_out, logits);
        for (int r = 0; r < BATCH; r++) { /* softmax cross-entropy */
            float max = logits[r * C], sum = 0.0f;
            for (int c = 1; c < C; c++) max = logits[r * C + c] > max ? logits[r * C + c] : max;
            for (int c = 0; c < C; c++) sum += expf(logits[r * C + c] - max);
            loss += (logf(sum) + max - logits[r * C + label[first + r]]) / BATCH;
            for (int c = 0; c < C; c++)
                dlogits[r * C + c] = (expf(logits[r * C + c] - max) / sum - (c == label[first + r])) / BATCH;
        }
        linear_backward(BATCH, D, C, y, w_out, dlogits, dy, g_out);
        if (fm_moe_backward(&desc, &params, &batch, saved, dy, 0, &weights, dh, 0, &grads, workspace) != FM_OK) return 1;
        for (int i = 0; i < BATCH * D; i++) dh[i] += dy[i];
        linear_backward(BATCH, F, D, x + first * F, w_in, dh, NULL, g_in);
        for (int i = 0; i < 6; i++)
            for (size_t k = 0; k < count[i]; k++) p[i][k] -= 0.1f * g[i][k];
        for (int i = 0; i < F * D; i++) w_in[i] -= 0.1f * g_in[i];
        for (int i = 0; i < D * C; i++) w_out[i] -= 0.1f * g_out[i];
        for (int e = 0; e < E; e++) busiest = rows[e] > busiest ? rows[e] : busiest;
        if (step % 50 == 0 || step == STEPS - 1)
            printf("step %3d  loss %.4f  gate loss %.3f  busiest expert %d of %d rows\n", step, loss, stats.gate_loss,
                   busiest, stats.rows);
    }
    int correct = 0; /* inference: no saved buffer, no noise */
    for (int first = 0; first < N; first += BATCH) {
        fm_moe_batch batch = {0};
        linear(BATCH, F, D, x + first * F, w_in, h);
        batch.tokens = BATCH, batch.x = h;
        if (fm_moe_forward(&desc, &params, &batch, y, 0, NULL, workspace, NULL) != FM_OK) return 1;
        for (int i = 0; i < BATCH * D; i++) y[i] += h[i];
        linear(BATCH, D, C, y, w_out, logits);
        for (int r = 0; r < BATCH; r++) {
            int best = 0;
            for (int c = 1; c < C; c++) best = logits[r * C + c] > logits[r * C + best] ? c : best;
            correct += best == label[first + r];
        }
    }
    printf("training accuracy %.3f\n", (double)correct / N);
    fm_free(saved), fm_free(workspace), free(plain1), free(plain2);
    for (int i = 0; i < 6; i++) fm_free(p[i]), fm_free(g[i]);
    return 0;
}
