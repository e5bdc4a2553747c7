package dev.edgemtp.core

import org.junit.Assert.assertEquals
import org.junit.Test

class DecodeStatsTest {
    @Test
    fun `empty statistics are all zero, never NaN`() {
        val s = DecodeStats(3)
        for ((key, value) in s.toMap()) {
            when (value) {
                is Double -> assertEquals(key, 0.0, value, 0.0)
                is Int -> if (key != "draft_len") assertEquals(key, 0, value)
                is List<*> -> value.forEach { assertEquals(key, 0.0, it as Double, 0.0) }
            }
        }
        assertEquals(listOf(0.0, 0.0, 0.0), s.perPositionAcceptance)
    }

    @Test
    fun `definitions match the shared glossary`() {
        val s = DecodeStats(4)
        for (k in listOf(4, 0, 2, 4, 1)) s.verifyRound(4, k)
        s.plainDecode()
        assertEquals(20, s.drafted)
        assertEquals(11, s.accepted)
        assertEquals(5, s.verifies)
        assertEquals(3, s.rejectedRounds)
        assertEquals(1, s.plainDecodes)
        assertEquals(11.0 / 20, s.draftAcceptanceRate, 1e-12)
        assertEquals(11.0 / 14, s.acceptanceRate, 1e-12)
        assertEquals(16.0 / 5, s.meanAcceptedLength, 1e-12)
        assertEquals(listOf(0.8, 0.6, 0.4, 0.4), s.perPositionAcceptance)
    }

    @Test
    fun `map keys are the snake_case names the Python runtime writes`() {
        val keys = DecodeStats(2).toMap().keys
        for (key in listOf(
            "drafted", "accepted", "verifies", "plain_decodes", "draft_acceptance_rate", "acceptance_rate",
            "mean_accepted_length", "per_position_acceptance", "accepted_per_round", "time_to_first_token_ms",
            "tokens_per_second",
        )) assertEquals(key, true, key in keys)
    }

    @Test
    fun `timings are means over their own step counts`() {
        val s = DecodeStats(2)
        s.start(0)
        s.prefillTook(50_000_000)
        s.decodeTook(10_000_000)
        s.firstToken(60_000_000)
        repeat(3) { s.emitted() }
        s.draftTook(8_000_000)
        s.verifyTook(30_000_000)
        s.verifyRound(2, 1)
        s.end(100_000_000)
        assertEquals(60.0, s.timeToFirstTokenMs, 1e-9)
        assertEquals(10.0, s.decodeMsPerStep, 1e-9)
        assertEquals(4.0, s.draftMsPerStep, 1e-9)
        assertEquals(30.0, s.verifyMsPerStep, 1e-9)
        assertEquals(2 / 0.04, s.tokensPerSecond, 1e-9)
    }
}
