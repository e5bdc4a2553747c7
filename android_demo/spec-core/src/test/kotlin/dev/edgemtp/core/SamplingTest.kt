package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import kotlin.math.ln
import kotlin.math.sqrt
import kotlin.random.Random

class SamplingTest {
    private val eps = 1e-12

    @Test
    fun `argmax picks the lowest index on ties`() {
        assertEquals(1, argmax(floatArrayOf(0f, 3f, 3f, -1f)))
    }

    @Test
    fun `temperature scales logits before the softmax`() {
        val logits = floatArrayOf(0f, ln(2.0).toFloat())
        assertArrayEquals(doubleArrayOf(1.0 / 3, 2.0 / 3), probabilities(logits, SamplerConfig(1.0)), 1e-6)
        val s = sqrt(2.0)
        assertArrayEquals(doubleArrayOf(1 / (1 + s), s / (1 + s)), probabilities(logits, SamplerConfig(2.0)), 1e-6)
    }

    @Test
    fun `greedy configs give a one-hot at the argmax`() {
        val logits = floatArrayOf(0.1f, 2f, 1f)
        assertArrayEquals(doubleArrayOf(0.0, 1.0, 0.0), probabilities(logits, SamplerConfig.GREEDY), eps)
        assertArrayEquals(doubleArrayOf(0.0, 1.0, 0.0), probabilities(logits, SamplerConfig(topK = 1)), eps)
    }

    private fun logitsOf(vararg probs: Double) = FloatArray(probs.size) { ln(probs[it]).toFloat() }

    @Test
    fun `top-k keeps the k most likely tokens`() {
        val p = probabilities(logitsOf(0.1, 0.4, 0.2, 0.3), SamplerConfig(topK = 2))
        assertArrayEquals(doubleArrayOf(0.0, 4.0 / 7, 0.0, 3.0 / 7), p, 1e-6)
    }

    @Test
    fun `top-p keeps the smallest set reaching p`() {
        val logits = logitsOf(0.5, 0.3, 0.15, 0.05)
        assertArrayEquals(doubleArrayOf(0.625, 0.375, 0.0, 0.0), probabilities(logits, SamplerConfig(topP = 0.8)), 1e-6)
        assertArrayEquals(doubleArrayOf(0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0), probabilities(logits, SamplerConfig(topP = 0.81)), 1e-6)
        assertArrayEquals(doubleArrayOf(1.0, 0.0, 0.0, 0.0), probabilities(logits, SamplerConfig(topP = 0.01)), 1e-6)
    }

    @Test
    fun `top-k and top-p combine`() {
        val p = probabilities(logitsOf(0.5, 0.3, 0.15, 0.05), SamplerConfig(topK = 3, topP = 0.9))
        assertArrayEquals(doubleArrayOf(0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0), p, 1e-6)
    }

    @Test
    fun `invalid configs are refused`() {
        for (make in listOf({ SamplerConfig(-1.0) }, { SamplerConfig(topK = -1) }, { SamplerConfig(topP = 0.0) }, { SamplerConfig(topP = 1.5) })) {
            try { make(); throw AssertionError("accepted an invalid config") } catch (_: IllegalArgumentException) {}
        }
    }

    @Test
    fun `sample follows the distribution and never picks a zero-probability token`() {
        val p = doubleArrayOf(0.2, 0.0, 0.5, 0.3)
        val counts = IntArray(4)
        val rng = Random(11)
        repeat(40_000) { counts[sample(p, rng)]++ }
        assertEquals(0, counts[1])
        assertTrue("chi2 too large: ${chiSquare(counts, p)}", chiSquare(counts, p) < 16.3) // df 2, p = 0.0003
    }

    @Test
    fun `the same seed gives the same samples`() {
        val p = doubleArrayOf(0.25, 0.25, 0.25, 0.25)
        val a = Random(5).let { r -> List(50) { sample(p, r) } }
        val b = Random(5).let { r -> List(50) { sample(p, r) } }
        assertEquals(a, b)
    }
}

/** Pearson's chi-square statistic of [counts] against [probs], over the cells with probability > 0. */
fun chiSquare(counts: IntArray, probs: DoubleArray): Double {
    val n = counts.sum().toDouble()
    var chi = 0.0
    for (i in counts.indices) {
        if (probs[i] <= 0.0) { require(counts[i] == 0) { "count ${counts[i]} in a zero-probability cell $i" }; continue }
        val e = n * probs[i]
        chi += (counts[i] - e) * (counts[i] - e) / e
    }
    return chi
}

/**
 * Chi-square statistic and degrees of freedom after pooling every cell expected below [minExpected]
 * counts into one, so that rare cells do not dominate the statistic.
 */
fun pooledChiSquare(counts: IntArray, probs: DoubleArray, minExpected: Double = 5.0): Pair<Double, Int> {
    val n = counts.sum().toDouble()
    val big = probs.indices.filter { n * probs[it] >= minExpected }
    val small = probs.indices - big.toSet()
    val cellCounts = big.map { counts[it] } + listOf(small.sumOf { counts[it] })
    val cellProbs = big.map { probs[it] } + listOf(small.sumOf { probs[it] })
    return chiSquare(cellCounts.toIntArray(), cellProbs.toDoubleArray()) to (cellCounts.size - 1)
}

/** Approximate 0.999 quantile of the chi-square distribution with [df] degrees of freedom (Wilson-Hilferty). */
fun chiSquareBound(df: Int): Double {
    val a = 2.0 / (9.0 * df)
    val x = 1 - a + 3.09 * kotlin.math.sqrt(a)
    return df * x * x * x
}
