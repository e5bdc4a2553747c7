package dev.edgemtp.core

import kotlin.random.Random

/**
 * Exact speculative sampling for one round (Leviathan et al. 2023; Chen et al. 2023): the tokens it
 * emits are distributed exactly as if sampled from the target alone.
 *
 * @param target `p_0..p_G`: `p_i` is the target's distribution after `[t, d_1..d_i]` (verify row i).
 * @param draft `q_1..q_G`: `q_i` is the drafter distribution `d_i` was sampled from (one-hot for an
 *   argmax drafter).
 * @param drafts `d_1..d_G`.
 * @return `k` accepted drafts and the next token: on the first rejection (draft `k+1`) a sample from
 *   `normalise(max(0, p_k - q_{k+1}))`; if every draft is accepted, a bonus sample from `p_G`.
 */
fun speculativeAccept(
    target: List<DoubleArray>,
    draft: List<DoubleArray>,
    drafts: IntArray,
    rng: Random,
): Verdict {
    require(draft.size == drafts.size && target.size == drafts.size + 1) {
        "need G+1 target rows and G draft rows for G=${drafts.size} drafts, got ${target.size} and ${draft.size}"
    }
    for (i in drafts.indices) {
        val x = drafts[i]
        val p = target[i][x]
        val q = draft[i][x]
        // Accept with probability min(1, p/q); q > 0 because x was sampled from it.
        if (q <= 0.0 || rng.nextDouble() * q >= p) return Verdict(i, sample(residual(target[i], draft[i]), rng))
    }
    return Verdict(drafts.size, sample(target[drafts.size], rng))
}

/**
 * `normalise(max(0, p - q))`, the distribution to resample from after a rejection. Where it has no
 * mass (p == q up to rounding, so a rejection was impossible in exact arithmetic) it is `p` itself.
 */
fun residual(p: DoubleArray, q: DoubleArray): DoubleArray {
    require(p.size == q.size) { "target and draft distributions differ in size: ${p.size} vs ${q.size}" }
    val r = DoubleArray(p.size) { maxOf(0.0, p[it] - q[it]) }
    return if (r.sum() > 0.0) normalise(r) else p.copyOf()
}
