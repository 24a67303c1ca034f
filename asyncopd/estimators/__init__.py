"""Distillation estimators: pure tensor functions that return `EstimatorOut(loss, metrics)`.

    kl.py               vocabulary-sized: exact forward/reverse KL, top-k forward/reverse KL with a tail
                        option, M-sample MC reverse KL; chunked over rows by one autograd Function
    policy_gradient.py  1-sample reverse KL as a policy gradient with off-policy corrections
                        (none, is, tis, clip, decoupled, m2po), and VCPO's ESS, LR scale and baseline
    stability.py        StableOPD: truncation rate, n-gram repetition, divergence to the reference

Pick an estimator by name with the literal dict `ESTIMATORS` (no registry). Each takes its own inputs, so a
run loop still branches on which cache fields it passes; the dict only turns a config string into a function.
"""

from asyncopd.config import DEFAULT_CHUNK_BYTES, chunk_rows
from asyncopd.estimators.kl import (
    LOG_RATIO_GUARD,
    TAILS,
    EstimatorOut,
    forward_kl_exact,
    forward_kl_topk,
    reverse_kl_exact,
    reverse_kl_mc,
    reverse_kl_topk,
    token_logp,
)
from asyncopd.estimators.policy_gradient import (
    BASELINES,
    CORRECTIONS,
    SIGNALS,
    logit_grad_sq,
    reverse_kl_sampled,
    vcpo_baseline,
    vcpo_ess,
    vcpo_lr_scale,
)
from asyncopd.estimators.stability import (
    ngram_repetition,
    reference_kl_exact,
    reference_kl_penalty,
    truncation_rate,
)

ESTIMATORS = {
    "forward_kl_exact": forward_kl_exact,      # (student_logits, teacher_logits, mask)
    "reverse_kl_exact": reverse_kl_exact,      # (student_logits, teacher_logits, mask)
    "forward_kl_topk": forward_kl_topk,        # (student_logits, teacher_topk_ids, teacher_topk_logp, mask)
    "reverse_kl_topk": reverse_kl_topk,        # (student_logits, support_ids, teacher_support_logp, mask)
    "reverse_kl_sampled": reverse_kl_sampled,  # (student_logp, teacher_logp, mask)
    "reverse_kl_mc": reverse_kl_mc,            # (student_logits, sample_ids, teacher_sample_logp, mask)
}

__all__ = [
    "BASELINES", "CORRECTIONS", "DEFAULT_CHUNK_BYTES", "ESTIMATORS", "LOG_RATIO_GUARD", "SIGNALS", "TAILS", "EstimatorOut",
    "forward_kl_exact", "forward_kl_topk", "logit_grad_sq", "ngram_repetition", "reference_kl_exact", "reference_kl_penalty",
    "chunk_rows", "reverse_kl_exact", "reverse_kl_mc", "reverse_kl_sampled", "reverse_kl_topk", "token_logp",
    "truncation_rate",
    "vcpo_baseline", "vcpo_ess", "vcpo_lr_scale",
]
