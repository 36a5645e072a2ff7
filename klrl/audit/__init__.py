"""`klrl audit`: what gradient each KL configuration really produces.

Every configuration (estimator k1/k2/k3 x placement reward(seqsum) / reward(togo) / loss / both x importance
weights seqIS / tokIS, see `configs`) is run through the trainer's own `policy_loss` on a policy small enough to
enumerate (`policies`: tabular logits or a tiny transformer), giving its exact mean gradient and exact variance
(`exact`, `run`); or, on a real model, through the rollout code with a significance test (`mc`, `mc_cli`).

Expected gradient of the KL part, per unit beta, on-policy (y ~ pi), which the audit confirms numerically;
rev = grad KL(pi||pi_ref), Fctx = sum_s P_pi(s) grad KL(pi_ref(.|s)||pi(.|s)),
Rtok = sum_s P_pi(s) grad KL(pi(.|s)||pi_ref(.|s)):

    k1 reward (seqsum or togo)   E[(sum_t k1) grad log pi(y)]          = rev                unbiased
    k1 loss                      E[sum_t grad log pi(y_t|s_t)]         = 0                  zero in expectation
    k3 loss                      E[sum_t (1 - r_t) grad log pi_t]      = Fctx               biased (per-context fwd KL)
    k3 reward                    score-function term of k3             = rev - Fctx         biased
    k1/k3 both                   pathwise + score function             = rev                unbiased
    k2 loss, k1/k3 loss+tokIS    E[sum_t delta_t grad log pi_t]        = Rtok               biased (token-level partial)
    k2 reward, k2 both           no closed form                                             biased
    dr_grpo baseline, seqsum     the penalty's own share of the mean   = (1 - 1/G) rev      biased (shrunk)

Off-policy (y ~ pi_old): only k1 in the reward with the sequence weight (seqIS) stays unbiased; the token-weighted
loss forms (tokIS) give Rtok over pi_old's contexts, and every unweighted form is biased.
"""
