package dev.edgemtp.core

/**
 * Limits of one generation. [draftLength] G = 0 turns MTP off (plain decoding). [maxTokens] counts
 * every emitted token, the first one included. A token in [stopTokens] is emitted and ends the output.
 */
data class DecodeConfig(
    val draftLength: Int,
    val maxTokens: Int,
    val stopTokens: Set<Int> = emptySet(),
) {
    init {
        require(draftLength >= 0) { "draftLength must be >= 0, got $draftLength" }
        require(maxTokens >= 1) { "maxTokens must be >= 1, got $maxTokens" }
    }
}

/** Receives each token as soon as it is decided; returning false cancels the generation. */
fun interface TokenSink {
    /** Called once per emitted token, in order. */
    fun accept(token: Int): Boolean
}

/** Why a generation ended. */
enum class FinishReason { STOP_TOKEN, MAX_TOKENS, CONTEXT_FULL, CANCELLED }

/** The emitted tokens (first token included), why generation ended, and its statistics. */
class Generation(val tokens: IntArray, val finishReason: FinishReason, val stats: DecodeStats)

/**
 * The draft/verify loop, independent of backend and of the acceptance rule ([Speculator]).
 *
 * After prefill, a first decode of the last prompt token yields `t` at position `N` = prompt length.
 * Each round drafts G tokens, verifies `[t, d1..dG]` at `N..N+G`, keeps `d1..dk` plus the verdict's
 * next token, and continues from that token at `N+k+1`. When `N+G+1` exceeds the context, a round
 * is a plain decode of `[t]` alone. Output stops at a stop token, after [DecodeConfig.maxTokens]
 * tokens (an accepted run is truncated), when the context is full, or when the sink cancels.
 */
class SpeculativeDecoder(
    private val speculator: Speculator,
    private val clock: Clock = Clock.SYSTEM,
) {
    /** Generates a continuation of [prompt], streaming each token to [sink]. */
    fun generate(prompt: IntArray, config: DecodeConfig, sink: TokenSink = TokenSink { true }): Generation {
        val context = speculator.contextLength
        val g = config.draftLength
        require(prompt.isNotEmpty()) { "the prompt is empty: it needs at least one token" }
        require(prompt.size <= context) {
            "the prompt has ${prompt.size} tokens but the context holds $context: shorten it or use a bundle with a larger context"
        }
        val stats = DecodeStats(g)
        val out = Output(config, sink, stats)
        stats.start(clock.nanoTime())

        timed(stats::prefillTook) { speculator.prefill(prompt.copyOfRange(0, prompt.size - 1)) }
        var token = timed(stats::decodeTook) { speculator.decode(prompt.size - 1, prompt.last()) }
        stats.firstToken(clock.nanoTime())
        out.emit(token)
        var position = prompt.size

        while (out.finish == null) {
            if (g > 0 && position + g + 1 <= context) {
                val drafts = timed(stats::draftTook) { speculator.draft(position, token, g) }
                val verdict = timed(stats::verifyTook) { speculator.verify(position, token, drafts) }
                stats.verifyRound(drafts.size, verdict.accepted)
                out.emit(drafts.copyOfRange(0, verdict.accepted) + verdict.next)
                position += verdict.accepted + 1
                token = verdict.next
            } else if (position < context) {
                token = timed(stats::decodeTook) { speculator.decode(position, token) }
                stats.plainDecode()
                out.emit(token)
                position += 1
            } else {
                out.finish = FinishReason.CONTEXT_FULL
            }
        }
        stats.end(clock.nanoTime())
        return Generation(out.tokens.toIntArray(), out.finish!!, stats)
    }

    private inline fun <T> timed(record: (Long) -> Unit, block: () -> T): T {
        val begin = clock.nanoTime()
        val result = block()
        record(clock.nanoTime() - begin)
        return result
    }

    /** Collects emitted tokens and decides when output must stop. */
    private class Output(private val config: DecodeConfig, private val sink: TokenSink, private val stats: DecodeStats) {
        val tokens = ArrayList<Int>()
        var finish: FinishReason? = null

        fun emit(token: Int) = emit(intArrayOf(token))

        /** Emits [run] in order, dropping whatever follows the token that ends the output. */
        fun emit(run: IntArray) {
            for (token in run) {
                if (finish != null) return
                tokens += token
                stats.emitted()
                finish = when {
                    !sink.accept(token) -> FinishReason.CANCELLED
                    token in config.stopTokens -> FinishReason.STOP_TOKEN
                    tokens.size >= config.maxTokens -> FinishReason.MAX_TOKENS
                    else -> null
                }
            }
        }
    }
}
