package dev.edgemtp.core

/** Outcome of one verify: [accepted] drafts were kept, and [next] is the token emitted after them. */
data class Verdict(val accepted: Int, val next: Int)

/**
 * How one draft/verify round picks tokens: greedily, exactly as LiteRT-LM ([GreedySpeculator]), or by
 * exact speculative sampling ([SampledSpeculator]). [SpeculativeDecoder] owns the loop around it.
 */
interface Speculator {
    /** Number of KV-cache slots of the underlying model. */
    val contextLength: Int

    /** Writes the cache entries of [tokens] at positions `0 until tokens.size`. */
    fun prefill(tokens: IntArray)

    /** One target step on [token] at [position]; returns the next token. */
    fun decode(position: Int, token: Int): Int

    /** Proposes [count] drafts following [token], which belongs at [position]. */
    fun draft(position: Int, token: Int, count: Int): IntArray

    /** Verifies `[token] + drafts` at [position], decides how many drafts survive, and picks the next token. */
    fun verify(position: Int, token: Int, drafts: IntArray): Verdict
}
