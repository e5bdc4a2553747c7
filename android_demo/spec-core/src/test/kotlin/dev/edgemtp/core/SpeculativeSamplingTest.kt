package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import kotlin.random.Random

/**
 * Statistical checks that speculative sampling reproduces the target's distribution. Every run uses a
 * fixed seed, so the checks are deterministic; the bounds are chi-square quantiles far in the tail
 * (p about 0.001), while a wrong acceptance rule gives statistics in the hundreds or thousands.
 */
class SpeculativeSamplingTest {
    private val p = doubleArrayOf(0.4, 0.3, 0.2, 0.1, 0.0)
    private val q = doubleArrayOf(0.1, 0.1, 0.2, 0.3, 0.3)

    /** Emitted tokens of one round where every target row is [p] and every drafter row is [draftRow]. */
    private fun round(g: Int, draftRow: (Random) -> DoubleArray, rng: Random): List<Int> {
        val rows = List(g) { draftRow(rng) }
        val drafts = IntArray(g) { sample(rows[it], rng) }
        val verdict = speculativeAccept(List(g + 1) { p }, rows, drafts, rng)
        return drafts.take(verdict.accepted) + verdict.next
    }

    /** Token counts at emitted positions 0 and 1 over many rounds; each must follow [p]. */
    private fun countsAt(draftRow: (Random) -> DoubleArray): List<IntArray> {
        val rng = Random(1234)
        val counts = List(2) { IntArray(p.size) }
        repeat(60_000) {
            val out = round(3, draftRow, rng)
            out.take(2).forEachIndexed { i, t -> counts[i][t]++ }
        }
        return counts
    }

    @Test
    fun `output follows the target when the drafter disagrees with it`() {
        countsAt { q }.forEachIndexed { i, c -> assertTrue("position $i chi2 ${chiSquare(c, p)}", chiSquare(c, p) < 16.3) }
    }

    @Test
    fun `output follows the target with a one-hot (argmax) drafter`() {
        // An argmax drafter that always proposes token 3, which the target rarely wants.
        countsAt { oneHot(5, 3) }.forEachIndexed { i, c -> assertTrue("position $i chi2 ${chiSquare(c, p)}", chiSquare(c, p) < 16.3) }
    }

    @Test
    fun `the check has power, accepting every draft would fail it`() {
        // Without the rejection step the first token follows q, not p.
        val rng = Random(99)
        val counts = IntArray(p.size)
        repeat(60_000) { counts[sample(q, rng)]++ }
        assertTrue(counts[4] > 0) // q puts mass where p has none: chiSquare refuses such counts.
        val onSupport = IntArray(4) { counts[it] }
        assertTrue(chiSquare(onSupport, doubleArrayOf(0.4, 0.3, 0.2, 0.1)) > 1000)
    }

    @Test
    fun `identical drafter and target accept everything`() {
        val rng = Random(3)
        repeat(1000) {
            val drafts = IntArray(3) { sample(p, rng) }
            assertEquals(3, speculativeAccept(List(4) { p }, List(3) { p }, drafts, rng).accepted)
        }
    }

    @Test
    fun `a draft the target never picks is always rejected`() {
        val rng = Random(4)
        repeat(1000) {
            val verdict = speculativeAccept(List(3) { p }, List(2) { oneHot(5, 4) }, intArrayOf(4, 4), rng)
            assertEquals(0, verdict.accepted)
            assertTrue(verdict.next != 4)
        }
    }

    @Test
    fun `residual is the normalised positive part of p - q`() {
        assertArrayEquals(doubleArrayOf(0.0, 1.0), residual(doubleArrayOf(0.5, 0.5), doubleArrayOf(1.0, 0.0)), 1e-12)
        assertArrayEquals(doubleArrayOf(0.75, 0.25, 0.0), residual(doubleArrayOf(0.5, 0.3, 0.2), doubleArrayOf(0.2, 0.2, 0.6)), 1e-12)
        assertArrayEquals(doubleArrayOf(0.5, 0.5), residual(doubleArrayOf(0.5, 0.5), doubleArrayOf(0.5, 0.5)), 1e-12)
    }

    @Test
    fun `sampled MTP generation has the target's joint distribution`() {
        // Exact joint distribution of the first three tokens under the target alone.
        val vocab = 4
        val prompt = intArrayOf(2, 0)
        val sampler = SamplerConfig(temperature = 1.0)
        val reference = CacheModel(32, vocab = vocab)
        val joint = DoubleArray(vocab * vocab * vocab)
        for (a in 0 until vocab) for (b in 0 until vocab) for (c in 0 until vocab) {
            val pa = probabilities(reference.targetLogits(prompt.toList()), sampler)[a]
            val pb = probabilities(reference.targetLogits(prompt.toList() + a), sampler)[b]
            val pc = probabilities(reference.targetLogits(prompt.toList() + a + b), sampler)[c]
            joint[(a * vocab + b) * vocab + c] = pa * pb * pc
        }
        val counts = IntArray(joint.size)
        val rng = Random(2024)
        var accepted = 0
        repeat(20_000) {
            // A noisy drafter that also over-proposes token 0, so that q differs from p in a consistent way.
            val model = CacheModel(32, vocab = vocab, draftNoise = 1f, draftBias = 2f, seed = it)
            val out = SpeculativeDecoder(SampledSpeculator(model, sampler, rng = rng))
                .generate(prompt, DecodeConfig(2, maxTokens = 3))
            accepted += out.stats.accepted
            counts[(out.tokens[0] * vocab + out.tokens[1]) * vocab + out.tokens[2]]++
        }
        assertTrue("drafts were accepted: $accepted", accepted > 5000)
        val (chi, df) = pooledChiSquare(counts, joint)
        assertTrue("chi2 $chi with $df degrees of freedom", chi < chiSquareBound(df))
    }
}
