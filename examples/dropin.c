/* The smallest flexmoe program: route 4 tokens over 8 experts with a softmax gate.
 *
 *     cc -O2 -I. examples/dropin.c -lm && ./a.out
 */
#define FLEXMOE_IMPLEMENTATION
#include "flexmoe.h"

#include <stdio.h>

enum { TOKENS = 4, EXPERTS = 8 };

int main(void) {
    /* gate logits, one row per token (in a model: token activations times the gate weights) */
    float logits[TOKENS][EXPERTS] = {
        {2.0f, 0.1f, -1.0f, 0.5f, 0.0f, 0.3f, -0.2f, 1.0f},
        {-1.0f, 3.0f, 0.0f, 0.0f, 0.2f, -0.5f, 0.1f, 0.0f},
        {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f},
        {1e30f, 0.0f, -1e30f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f},
    };
    float probs[TOKENS][EXPERTS];
    int t, e;
    fm_status status = fm_softmax_forward(TOKENS, EXPERTS, &logits[0][0], EXPERTS, &probs[0][0], EXPERTS);
    if (status != FM_OK) {
        fprintf(stderr, "fm_softmax_forward: %s\n", fm_status_str(status));
        return 1;
    }
    printf("softmax gate on the %s path\n", fm_isa_name(fm_active_isa()));
    for (t = 0; t < TOKENS; t++) {
        int best = 0;
        printf("token %d:", t);
        for (e = 0; e < EXPERTS; e++) {
            printf(" %.3f", probs[t][e]);
            if (probs[t][e] > probs[t][best]) best = e;
        }
        printf("  -> expert %d\n", best);
    }
    return 0;
}
