package dev.edgemtp.core

import kotlin.random.Random

/**
 * A toy target + drafter over a real position-indexed cache, so that a loop passing a wrong position
 * or token changes the output. The target's logits are a fixed pseudo-random function of the cached
 * prefix `cache[0..p]`; the drafter sees `cache[0..N-1]` plus its own inputs and adds seeded noise of
 * amplitude [draftNoise] to the target's logits (0 = a perfect drafter), plus [draftBias] to the logit
 * of token 0 (a systematically wrong drafter).
 */
class CacheModel(
    override val contextLength: Int,
    private val vocab: Int = 16,
    private val draftNoise: Float = 0f,
    private val draftBias: Float = 0f,
    seed: Int = 7,
    /** Called at the start of every model call with its name ("prefill", "decode", "draft", "verify"). */
    private val onCall: (String) -> Unit = {},
) : MtpLogitsModel {
    private val cache = IntArray(contextLength) { -1 }
    private var written = 0
    private val noise = Random(seed)
    private var draftContext: MutableList<Int>? = null
    private var verifyPosition = -1

    /** Every draft step's position argument, in order. */
    val draftPositions = ArrayList<Int>()

    /** Target logits after the prefix [tokens]. */
    fun targetLogits(tokens: List<Int>): FloatArray {
        val r = Random(tokens.fold(17) { h, t -> h * 31 + t })
        return FloatArray(vocab) { r.nextFloat() * 4f }
    }

    override fun prefill(tokens: IntArray) {
        onCall("prefill")
        tokens.forEachIndexed { i, t -> write(i, t) }
    }

    override fun decode(position: Int, token: Int): FloatArray {
        onCall("decode")
        write(position, token)
        draftContext = null
        return targetLogits(prefix(position))
    }

    override fun draftStep(position: Int, token: Int): FloatArray {
        onCall("draft")
        draftPositions += position
        check(position == written) { "draft for position $position but the cache holds $written tokens" }
        val context = draftContext ?: prefix(position - 1).toMutableList().also { draftContext = it }
        context += token
        val logits = targetLogits(context)
        for (i in logits.indices) logits[i] += draftNoise * (noise.nextFloat() * 2f - 1f)
        logits[0] += draftBias
        return logits
    }

    override fun verify(position: Int, tokens: IntArray): Array<FloatArray> {
        onCall("verify")
        verifyPosition = position
        return Array(tokens.size) { i ->
            write(position + i, tokens[i])
            targetLogits(prefix(position + i))
        }
    }

    override fun accept(count: Int) {
        check(verifyPosition >= 0) { "accept without a verify" }
        written = verifyPosition + count + 1 // rejected rows stay in the cache but are no longer valid
        verifyPosition = -1
        draftContext = null
    }

    private fun write(position: Int, token: Int) {
        check(position < contextLength) { "write at $position past the context $contextLength" }
        check(position <= written) { "write at $position leaves a gap after $written cached tokens" }
        cache[position] = token
        written = position + 1
    }

    private fun prefix(last: Int): List<Int> = (0..last).map { cache[it] }
}
