package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

/** Replays every case of testdata/vectors.json and checks decisions and statistics. */
class VectorsTest {
    private val cases: List<Map<String, Any?>> by lazy {
        val doc = Json.parse(TestData.file("vectors.json")).obj()
        assertEquals("vectors.json version", 1, doc["version"].int())
        doc["cases"].list().map { it.obj() }
    }

    @Test
    fun `vectors file covers the required situations`() {
        val names = cases.map { it["name"] as String }
        assertTrue("need at least 6 cases, have $names", names.size >= 6)
        // Structural coverage, independent of case names: every kind of round must occur somewhere.
        val expected = cases.map { it["expected"].obj() }
        assertTrue("a round with full acceptance", cases.zip(expected).any { (c, e) -> e["accepted_per_round"].ints().any { it == c["draft_len"].int() && it > 0 } })
        assertTrue("a round with zero acceptance", expected.any { e -> e["accepted_per_round"].ints().any { it == 0 } })
        assertTrue("a plain-decode fallback", expected.any { it["plain_decodes"].int() > 0 })
    }

    @Test
    fun `every case replays to the expected tokens and statistics`() {
        for (case in cases) replay(case)
    }

    private fun replay(case: Map<String, Any?>) {
        val name = case["name"] as String
        val rounds = case["rounds"].list().map { r ->
            val o = r.obj()
            ReplayRound(o["position"].int(), o["drafts"].ints(), o["target_argmax"].ints())
        }
        val model = ReplayModel(case["context"].int(), case["prompt_len"].int(), case["first_token"].int(), rounds)
        val config = DecodeConfig(case["draft_len"].int(), case["max_tokens"].int(), case["stop_tokens"].ints().toSet())
        val streamed = ArrayList<Int>()
        val result = SpeculativeDecoder(GreedySpeculator(model))
            .generate(IntArray(case["prompt_len"].int()) { 1000 + it }, config) { streamed += it; true }

        val e = case["expected"].obj()
        val s = result.stats
        assertArrayEquals("$name: tokens", e["tokens"].ints(), result.tokens)
        assertEquals("$name: streamed tokens", result.tokens.toList(), streamed)
        assertTrue("$name: every recorded round is used", model.exhausted)
        assertEquals("$name: accepted_per_round", e["accepted_per_round"].ints().toList(), s.acceptedPerRound)
        assertEquals("$name: accept() calls", s.acceptedPerRound, model.accepted)
        assertEquals("$name: drafted", e["drafted"].int(), s.drafted)
        assertEquals("$name: accepted", e["accepted"].int(), s.accepted)
        assertEquals("$name: verifies", e["verifies"].int(), s.verifies)
        assertEquals("$name: plain_decodes", e["plain_decodes"].int(), s.plainDecodes)
        assertEquals("$name: draft_acceptance_rate", e["draft_acceptance_rate"].dbl(), s.draftAcceptanceRate, 1e-12)
        assertEquals("$name: acceptance_rate", e["acceptance_rate"].dbl(), s.acceptanceRate, 1e-12)
        assertEquals("$name: mean_accepted_length", e["mean_accepted_length"].dbl(), s.meanAcceptedLength, 1e-12)
        val ppa = e["per_position_acceptance"].list().map { it.dbl() }
        assertEquals("$name: per_position_acceptance size", ppa.size, s.perPositionAcceptance.size)
        ppa.zip(s.perPositionAcceptance).forEach { (x, y) -> assertEquals("$name: per_position_acceptance", x, y, 1e-12) }
        assertEquals("$name: emitted_tokens", result.tokens.size, s.emittedTokens)
    }

    @Test
    fun `a hand-derived partial acceptance and a stop token inside a verify`() {
        // Worked out by hand, not by the Python loop: prompt at positions 0..2, first token 20 at position 3.
        // Round 1 (position 3): drafts 21, 22; the target picks 21, 30 -> 21 accepted, 22 rejected, 30 emitted.
        // Round 2 (position 5): drafts 40, 41; the target picks 1 (the stop token) first -> nothing accepted, 1 ends.
        val rounds = listOf(ReplayRound(3, intArrayOf(21, 22), intArrayOf(21, 30, 31)),
                            ReplayRound(5, intArrayOf(40, 41), intArrayOf(1, 51, 52)))
        val model = ReplayModel(64, 3, 20, rounds)
        val result = SpeculativeDecoder(GreedySpeculator(model))
            .generate(intArrayOf(1000, 1001, 1002), DecodeConfig(2, 10, setOf(1))) { true }
        assertArrayEquals(intArrayOf(20, 21, 30, 1), result.tokens)
        assertTrue(model.exhausted)
        assertEquals(listOf(1, 0), result.stats.acceptedPerRound)
        assertEquals(4, result.stats.drafted)
        assertEquals(1, result.stats.accepted)
        assertEquals(2, result.stats.verifies)
        assertEquals(0, result.stats.plainDecodes)
        assertEquals(0.25, result.stats.draftAcceptanceRate, 1e-12)
    }
}
