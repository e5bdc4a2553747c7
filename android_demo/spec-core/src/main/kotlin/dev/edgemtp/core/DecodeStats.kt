package dev.edgemtp.core

/**
 * Counters and timings of one generation. The definitions are shared with the Python runtime
 * (`edge_mtp.runtime`), whose JSON uses the snake_case keys of [toMap]. Every ratio with a zero
 * denominator is 0.0.
 */
class DecodeStats(
    /** Drafts proposed per verify round (G). */
    val draftLength: Int,
) {
    private val draftedPerRound = ArrayList<Int>()
    private val acceptedRounds = ArrayList<Int>()

    /** Accepted drafts `k` of each verify round, in order (plain-decode steps have no entry). */
    val acceptedPerRound: List<Int> get() = acceptedRounds

    /** Target steps on a single token after the first one, taken where a verify did not fit the context. */
    var plainDecodes: Int = 0
        private set

    /** Tokens handed to the caller, the first token included. */
    var emittedTokens: Int = 0
        private set

    private var startNanos = 0L
    private var firstTokenNanos = 0L
    private var endNanos = 0L
    private var prefillNanos = 0L
    private var decodeNanos = 0L
    private var decodeCalls = 0
    private var draftNanos = 0L
    private var verifyNanos = 0L

    /** Number of verify rounds (rounds with drafts). */
    val verifies: Int get() = acceptedRounds.size

    /** Draft tokens proposed in verify rounds. */
    val drafted: Int get() = draftedPerRound.sum()

    /** Draft tokens accepted, the sum of k (counted before any max-tokens truncation). */
    val accepted: Int get() = acceptedRounds.sum()

    /** Verify rounds that rejected a draft (k < drafts proposed). */
    val rejectedRounds: Int get() = acceptedRounds.indices.count { acceptedRounds[it] < draftedPerRound[it] }

    /** accepted / drafted: what LiteRT-LM logs as "MTP Drafter - Success rate". */
    val draftAcceptanceRate: Double get() = ratio(accepted, drafted)

    /** Per-token acceptance estimate a = accepted / (accepted + rejected rounds). */
    val acceptanceRate: Double get() = ratio(accepted, accepted + rejectedRounds)

    /** Tokens per verify including the bonus: (accepted + verifies) / verifies. */
    val meanAcceptedLength: Double get() = ratio(accepted + verifies, verifies)

    /** Entry i: fraction of verify rounds whose k > i, for i in 0 until [draftLength]. */
    val perPositionAcceptance: List<Double>
        get() = List(draftLength) { i -> ratio(acceptedRounds.count { it > i }, verifies) }

    /** Milliseconds from the start of generation (prefill included) to the first token. */
    val timeToFirstTokenMs: Double get() = millis(firstTokenNanos - startNanos)

    /** Milliseconds spent in prefill. */
    val prefillMs: Double get() = millis(prefillNanos)

    /** Mean milliseconds per single-token target step (the first decode and plain decodes). */
    val decodeMsPerStep: Double get() = ratio(millis(decodeNanos), decodeCalls)

    /** Mean milliseconds per drafter step (one per drafted token). */
    val draftMsPerStep: Double get() = ratio(millis(draftNanos), drafted)

    /** Mean milliseconds per verify call. */
    val verifyMsPerStep: Double get() = ratio(millis(verifyNanos), verifies)

    /** Decode speed: tokens after the first one per second, from the first token to the end. */
    val tokensPerSecond: Double
        get() = ratio((emittedTokens - 1).coerceAtLeast(0).toDouble(), (endNanos - firstTokenNanos) / 1e9)

    internal fun start(now: Long) { startNanos = now }
    internal fun prefillTook(nanos: Long) { prefillNanos += nanos }
    internal fun decodeTook(nanos: Long) { decodeNanos += nanos; decodeCalls++ }
    internal fun draftTook(nanos: Long) { draftNanos += nanos }
    internal fun verifyTook(nanos: Long) { verifyNanos += nanos }
    internal fun firstToken(now: Long) { firstTokenNanos = now }
    internal fun end(now: Long) { endNanos = now }
    internal fun plainDecode() { plainDecodes++ }
    internal fun emitted() { emittedTokens++ }

    internal fun verifyRound(drafted: Int, accepted: Int) {
        draftedPerRound += drafted
        acceptedRounds += accepted
    }

    /** All statistics under the snake_case keys the Python runtime writes. */
    fun toMap(): Map<String, Any> = linkedMapOf(
        "draft_len" to draftLength,
        "drafted" to drafted,
        "accepted" to accepted,
        "verifies" to verifies,
        "plain_decodes" to plainDecodes,
        "rejected_rounds" to rejectedRounds,
        "accepted_per_round" to acceptedPerRound.toList(),
        "draft_acceptance_rate" to draftAcceptanceRate,
        "acceptance_rate" to acceptanceRate,
        "mean_accepted_length" to meanAcceptedLength,
        "per_position_acceptance" to perPositionAcceptance,
        "emitted_tokens" to emittedTokens,
        "time_to_first_token_ms" to timeToFirstTokenMs,
        "prefill_ms" to prefillMs,
        "decode_ms_per_step" to decodeMsPerStep,
        "draft_ms_per_step" to draftMsPerStep,
        "verify_ms_per_step" to verifyMsPerStep,
        "tokens_per_second" to tokensPerSecond,
    )

    private fun millis(nanos: Long): Double = nanos / 1e6

    private fun ratio(numerator: Int, denominator: Int): Double = ratio(numerator.toDouble(), denominator.toDouble())

    private fun ratio(numerator: Double, denominator: Int): Double = ratio(numerator, denominator.toDouble())

    private fun ratio(numerator: Double, denominator: Double): Double =
        if (denominator == 0.0) 0.0 else numerator / denominator
}
