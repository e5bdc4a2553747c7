package dev.edgemtp.core

import kotlin.math.exp
import kotlin.random.Random

/**
 * How logits become a sampling distribution. [temperature] 0 means greedy (a one-hot at the argmax);
 * [topK] 0 keeps every token; [topP] 1 keeps every token.
 */
data class SamplerConfig(val temperature: Double = 1.0, val topK: Int = 0, val topP: Double = 1.0) {
    init {
        require(temperature >= 0.0) { "temperature must be >= 0, got $temperature" }
        require(topK >= 0) { "topK must be >= 0, got $topK" }
        require(topP > 0.0 && topP <= 1.0) { "topP must be in (0, 1], got $topP" }
    }

    /** True when this config always picks the argmax. */
    val isGreedy: Boolean get() = temperature == 0.0 || topK == 1

    companion object {
        /** Always the argmax. */
        val GREEDY = SamplerConfig(temperature = 0.0)
    }
}

/** Index of the largest value; the lowest index wins a tie (as numpy's argmax). */
fun argmax(values: FloatArray): Int {
    require(values.isNotEmpty()) { "argmax of an empty row" }
    var best = 0
    for (i in 1 until values.size) if (values[i] > values[best]) best = i
    return best
}

/** A distribution over [size] tokens with all its mass on [index]. */
fun oneHot(size: Int, index: Int): DoubleArray = DoubleArray(size).also { it[index] = 1.0 }

/**
 * Turns [logits] into probabilities: temperature scaling, softmax, then top-k and top-p (nucleus)
 * filtering, renormalised. Greedy configs give a one-hot at the argmax.
 */
fun probabilities(logits: FloatArray, config: SamplerConfig): DoubleArray {
    if (config.isGreedy) return oneHot(logits.size, argmax(logits))
    val max = logits.maxOrNull() ?: error("probabilities of an empty row")
    val probs = DoubleArray(logits.size) { exp((logits[it] - max) / config.temperature) }
    if (config.topK > 0 || config.topP < 1.0) keepTop(probs, config.topK, config.topP * probs.sum())
    return normalise(probs)
}

/** Zeroes every entry outside the [topK] largest and outside the smallest prefix reaching [massLimit]. */
private fun keepTop(probs: DoubleArray, topK: Int, massLimit: Double) {
    val order = probs.indices.sortedWith(compareByDescending<Int> { probs[it] }.thenBy { it })
    val limit = if (topK > 0) minOf(topK, probs.size) else probs.size
    var kept = 0
    var mass = 0.0
    for (index in order) {
        if (kept >= limit || (kept > 0 && mass >= massLimit)) probs[index] = 0.0
        else {
            kept++
            mass += probs[index]
        }
    }
}

/** Scales [weights] to sum to 1 in place and returns them; all-zero weights are an error. */
fun normalise(weights: DoubleArray): DoubleArray {
    val total = weights.sum()
    require(total > 0.0) { "cannot normalise a distribution with no mass" }
    for (i in weights.indices) weights[i] /= total
    return weights
}

/** Draws an index from [probs] (which need not be exactly normalised) by inverse CDF. */
fun sample(probs: DoubleArray, rng: Random): Int {
    val total = probs.sum()
    require(total > 0.0) { "cannot sample from a distribution with no mass" }
    val u = rng.nextDouble() * total
    var cumulative = 0.0
    var last = -1
    for (i in probs.indices) {
        if (probs[i] <= 0.0) continue
        cumulative += probs[i]
        last = i
        if (u < cumulative) return i
    }
    return last
}
