package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class SpeculativeDecoderTest {
    private val prompt = intArrayOf(3, 1, 4, 1, 5)

    private fun greedy(model: MtpLogitsModel, config: DecodeConfig, sink: TokenSink = TokenSink { true }): Generation =
        SpeculativeDecoder(GreedySpeculator(ArgmaxModel(model))).generate(prompt, config, sink)

    @Test
    fun `greedy MTP output equals plain greedy decoding for every draft length and drafter quality`() {
        val plain = greedy(CacheModel(64), DecodeConfig(draftLength = 0, maxTokens = 40))
        assertEquals(40, plain.tokens.size)
        assertEquals(39, plain.stats.plainDecodes)
        for (g in 1..5) for (noise in listOf(0f, 0.5f, 2f, 50f)) {
            val mtp = greedy(CacheModel(64, draftNoise = noise, seed = g), DecodeConfig(g, maxTokens = 40))
            assertArrayEquals("G=$g noise=$noise", plain.tokens, mtp.tokens)
        }
    }

    @Test
    fun `a perfect drafter is always accepted and a random one mostly rejected`() {
        val perfect = greedy(CacheModel(64), DecodeConfig(3, maxTokens = 30)).stats
        assertEquals(1.0, perfect.draftAcceptanceRate, 0.0)
        assertEquals(4.0, perfect.meanAcceptedLength, 0.0)
        val random = greedy(CacheModel(64, draftNoise = 100f), DecodeConfig(3, maxTokens = 30)).stats
        assertTrue("acceptance ${random.draftAcceptanceRate}", random.draftAcceptanceRate < 0.5)
    }

    @Test
    fun `prefill takes the prompt but its last token, which the first decode takes`() {
        val calls = ArrayList<String>()
        val model = object : MtpModel {
            override val contextLength = 32
            override fun prefill(tokens: IntArray) { calls += "prefill ${tokens.toList()}" }
            override fun decode(position: Int, token: Int): Int { calls += "decode $position $token"; return 9 }
            override fun draft(position: Int, token: Int, count: Int): IntArray { calls += "draft $position $token $count"; return intArrayOf(7, 8) }
            override fun verify(position: Int, tokens: IntArray): IntArray { calls += "verify $position ${tokens.toList()}"; return intArrayOf(7, 2, 6) }
            override fun accept(count: Int) { calls += "accept $count" }
        }
        val out = SpeculativeDecoder(GreedySpeculator(model)).generate(prompt, DecodeConfig(2, maxTokens = 3))
        assertEquals(
            listOf("prefill [3, 1, 4, 1]", "decode 4 5", "draft 5 9 2", "verify 5 [9, 7, 8]", "accept 1"),
            calls,
        )
        assertArrayEquals(intArrayOf(9, 7, 2), out.tokens)
        assertEquals(FinishReason.MAX_TOKENS, out.finishReason)
    }

    @Test
    fun `drafts read the cache up to N-1 and positions do not advance between draft steps`() {
        val model = CacheModel(64, draftNoise = 1f)
        greedy(model, DecodeConfig(3, maxTokens = 20))
        // Each round drafts 3 times at the same position: the position of the pending token t.
        assertEquals(0, model.draftPositions.size % 3)
        model.draftPositions.chunked(3).forEach { assertEquals(1, it.toSet().size) }
        assertEquals(prompt.size, model.draftPositions.first())
    }

    @Test
    fun `generation fills the context exactly and then stops`() {
        for (g in 0..4) {
            val out = greedy(CacheModel(16, draftNoise = 1f), DecodeConfig(g, maxTokens = 100))
            assertEquals("G=$g", FinishReason.CONTEXT_FULL, out.finishReason)
            // Positions prompt.size-1 .. 15 each produce one token.
            assertEquals("G=$g", 16 - prompt.size + 1, out.tokens.size)
        }
    }

    @Test
    fun `the sink sees every token in order and can cancel`() {
        val seen = ArrayList<Int>()
        val out = greedy(CacheModel(64), DecodeConfig(4, maxTokens = 50)) { seen += it; seen.size < 7 }
        assertEquals(FinishReason.CANCELLED, out.finishReason)
        assertEquals(7, out.tokens.size)
        assertEquals(out.tokens.toList(), seen)
    }

    @Test
    fun `a stop token ends the output and is emitted`() {
        val reference = greedy(CacheModel(64), DecodeConfig(0, maxTokens = 30)).tokens
        val stop = reference[10]
        val index = reference.indexOf(stop)
        val out = greedy(CacheModel(64), DecodeConfig(3, maxTokens = 30, stopTokens = setOf(stop)))
        assertEquals(FinishReason.STOP_TOKEN, out.finishReason)
        assertArrayEquals(reference.copyOfRange(0, index + 1), out.tokens)
    }

    @Test
    fun `max tokens is never exceeded, whatever the draft length`() {
        for (g in 1..6) for (max in 1..12) {
            val out = greedy(CacheModel(64), DecodeConfig(g, maxTokens = max))
            assertEquals("G=$g max=$max", max, out.tokens.size)
        }
    }

    @Test
    fun `a prompt that does not fit the context is refused with a clear message`() {
        try {
            greedy(CacheModel(4), DecodeConfig(2, maxTokens = 4))
            fail("expected an exception")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!, e.message!!.contains("5 tokens") && e.message!!.contains("context"))
        }
    }

    @Test
    fun `a prompt that fills the context exactly still gets its first token`() {
        val out = greedy(CacheModel(prompt.size), DecodeConfig(2, maxTokens = 4))
        assertEquals(1, out.tokens.size)
        assertEquals(FinishReason.CONTEXT_FULL, out.finishReason)
    }

    @Test
    fun `timings come from the clock`() {
        val clock = FakeClock()
        val cost = mapOf("prefill" to 100L, "decode" to 10L, "draft" to 2L, "verify" to 20L)
        val model = CacheModel(64, onCall = { clock.advanceMs(cost.getValue(it)) })
        val out = SpeculativeDecoder(GreedySpeculator(ArgmaxModel(model)), clock)
            .generate(prompt, DecodeConfig(3, maxTokens = 9))
        val s = out.stats
        // Perfect drafter: first token, then two rounds of 4 tokens.
        assertEquals(2, s.verifies)
        assertEquals(110.0, s.timeToFirstTokenMs, 1e-9)
        assertEquals(100.0, s.prefillMs, 1e-9)
        assertEquals(10.0, s.decodeMsPerStep, 1e-9)
        assertEquals(2.0, s.draftMsPerStep, 1e-9)
        assertEquals(20.0, s.verifyMsPerStep, 1e-9)
        // 8 tokens after the first, in 2 * (3 * 2 + 20) ms.
        assertEquals(8 / 0.052, s.tokensPerSecond, 1e-9)
    }
}

/** A clock that only moves when told to. */
class FakeClock : Clock {
    private var now = 1_000_000L
    override fun nanoTime(): Long = now
    fun advanceMs(ms: Long) { now += ms * 1_000_000 }
}
