package dev.edgemtp.core

import kotlin.random.Random

/**
 * Sampling rounds with exact speculative sampling ([speculativeAccept]): the output follows the
 * target's [targetSampler] distribution whatever the drafter does; a better drafter only means more
 * accepted drafts. [draftSampler] may be greedy (one-hot q), which LiteRT-LM's drafter amounts to.
 */
class SampledSpeculator(
    private val model: MtpLogitsModel,
    private val targetSampler: SamplerConfig,
    private val draftSampler: SamplerConfig = targetSampler,
    private val rng: Random = Random.Default,
) : Speculator {
    /** Distributions the drafts of the current round were drawn from (`q_1..q_G`). */
    private var draftRows: List<DoubleArray> = emptyList()

    override val contextLength: Int get() = model.contextLength

    override fun prefill(tokens: IntArray) = model.prefill(tokens)

    override fun decode(position: Int, token: Int): Int =
        sample(probabilities(model.decode(position, token), targetSampler), rng)

    override fun draft(position: Int, token: Int, count: Int): IntArray {
        val rows = ArrayList<DoubleArray>(count)
        val drafts = IntArray(count)
        var input = token
        for (i in 0 until count) {
            val q = probabilities(model.draftStep(position, input), draftSampler)
            input = sample(q, rng)
            rows += q
            drafts[i] = input
        }
        draftRows = rows
        return drafts
    }

    override fun verify(position: Int, token: Int, drafts: IntArray): Verdict {
        check(draftRows.size == drafts.size) { "verify called without a matching draft() in this round" }
        val target = model.verify(position, intArrayOf(token) + drafts).map { probabilities(it, targetSampler) }
        val verdict = speculativeAccept(target, draftRows, drafts, rng)
        draftRows = emptyList()
        model.accept(verdict.accepted)
        return verdict
    }
}
