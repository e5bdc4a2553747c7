package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals

/** One recorded round: drafts (empty for a plain decode) and the target's greedy rows. */
class ReplayRound(val position: Int, val drafts: IntArray, val targetArgmax: IntArray)

/**
 * A [MtpModel] that serves a recorded trace (a vectors.json case) and asserts that the loop asks for
 * exactly the recorded positions and tokens, in order.
 */
class ReplayModel(
    override val contextLength: Int,
    private val promptLength: Int,
    private val firstToken: Int,
    private val rounds: List<ReplayRound>,
    /** Called at the start of every model call (a fake clock can be advanced here). */
    private val onCall: (String) -> Unit = {},
) : MtpModel {
    private var next = 0
    private var firstDone = false
    private var pendingVerify: ReplayRound? = null
    private var lastVerified: ReplayRound? = null
    private var currentToken = -1

    /** Accepted counts the loop reported through [accept]. */
    val accepted = ArrayList<Int>()

    /** True when every recorded round was served. */
    val exhausted: Boolean get() = next == rounds.size && pendingVerify == null

    override fun prefill(tokens: IntArray) {
        onCall("prefill")
        assertEquals("prefill covers the prompt but its last token", promptLength - 1, tokens.size)
    }

    override fun decode(position: Int, token: Int): Int {
        onCall("decode")
        if (!firstDone) {
            assertEquals("first decode position", promptLength - 1, position)
            firstDone = true
            currentToken = firstToken
            return firstToken
        }
        assertEquals("token fed to the plain decode at $position", currentToken, token)
        val round = take(position)
        assertEquals("a plain decode was recorded as a verify round at $position", 0, round.drafts.size)
        currentToken = round.targetArgmax.single()
        return currentToken
    }

    override fun draft(position: Int, token: Int, count: Int): IntArray {
        onCall("draft")
        assertEquals("token fed to the drafter at $position", currentToken, token)
        val round = take(position)
        assertEquals("draft count at $position", round.drafts.size, count)
        pendingVerify = round
        return round.drafts.copyOf()
    }

    override fun verify(position: Int, tokens: IntArray): IntArray {
        onCall("verify")
        val round = pendingVerify ?: throw AssertionError("verify at $position without a draft")
        assertEquals("verify position", round.position, position)
        assertEquals("verify input t", currentToken, tokens[0])
        assertArrayEquals("verify input after [t]", round.drafts, tokens.copyOfRange(1, tokens.size))
        pendingVerify = null
        lastVerified = round
        return round.targetArgmax.copyOf()
    }

    override fun accept(count: Int) {
        val round = lastVerified ?: throw AssertionError("accept($count) without a verify")
        accepted += count
        currentToken = round.targetArgmax[count]
        lastVerified = null
    }

    private fun take(position: Int): ReplayRound {
        check(firstDone) { "a round before the first decode" }
        if (next >= rounds.size) throw AssertionError("the loop asked for round ${next + 1} at $position; only ${rounds.size} recorded")
        val round = rounds[next++]
        assertEquals("position of round $next", round.position, position)
        return round
    }
}
