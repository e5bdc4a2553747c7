package dev.edgemtp.core

/**
 * A target model and its MTP drafter seen at the level of greedy token ids, which is the view
 * LiteRT-LM's executor has. Target and drafter share one KV cache of [contextLength] slots;
 * positions are absolute cache slots.
 *
 * The loop ([SpeculativeDecoder] through [GreedySpeculator]) calls, in order: [prefill] once,
 * [decode] for the pending last prompt token, then rounds of [draft] + [verify] + [accept], or
 * [decode] alone where no drafting fits.
 */
interface MtpModel {
    /** Number of KV-cache slots; no token may be written at or past this position. */
    val contextLength: Int

    /** Writes the cache entries of [tokens] at positions `0 until tokens.size` ([tokens] may be empty). */
    fun prefill(tokens: IntArray)

    /**
     * Runs the target on one [token] at [position] and returns the greedy next token.
     * The step's activation becomes the drafter's carry.
     */
    fun decode(position: Int, token: Int): Int

    /**
     * Runs [count] drafter steps and returns the greedy drafts `d1..dcount` that follow [token],
     * the not-yet-cached token that belongs at [position]. The drafter reads the cache up to
     * `position - 1`; positions do not advance between draft steps.
     */
    fun draft(position: Int, token: Int, count: Int): IntArray

    /**
     * Runs the target on [tokens] at positions `position until position + tokens.size`, writing
     * their cache entries, and returns the greedy next token after each row (`v0..vG`).
     */
    fun verify(position: Int, tokens: IntArray): IntArray

    /**
     * Tells the model that the first [count] drafts of the last [verify] were accepted, so the
     * next drafter carry is verify activation row [count]. Rejected rows stay in the cache and
     * are overwritten by later writes; nothing is rolled back.
     */
    fun accept(count: Int)
}

/**
 * The same pair seen at the level of logits, which a sampling loop ([SampledSpeculator]) needs.
 * [ArgmaxModel] turns one into a greedy [MtpModel].
 */
interface MtpLogitsModel {
    /** Number of KV-cache slots. */
    val contextLength: Int

    /** Writes the cache entries of [tokens] at positions `0 until tokens.size`. */
    fun prefill(tokens: IntArray)

    /** Target step on [token] at [position]; returns the logits of the next token and sets the carry. */
    fun decode(position: Int, token: Int): FloatArray

    /**
     * One drafter step on [token] for the round whose pending token sits at [position]. The first
     * call after [decode] or [accept] starts from that carry; later calls continue the drafter's own
     * carry. Returns the drafter's logits for the following token.
     */
    fun draftStep(position: Int, token: Int): FloatArray

    /** Target on [tokens] at `position until position + tokens.size`; one logits row per token. */
    fun verify(position: Int, tokens: IntArray): Array<FloatArray>

    /** See [MtpModel.accept]. */
    fun accept(count: Int)
}

/** Greedy view of a [MtpLogitsModel]: every logits row is reduced to its [argmax]. */
class ArgmaxModel(private val model: MtpLogitsModel) : MtpModel {
    override val contextLength: Int get() = model.contextLength

    override fun prefill(tokens: IntArray) = model.prefill(tokens)

    override fun decode(position: Int, token: Int): Int = argmax(model.decode(position, token))

    override fun draft(position: Int, token: Int, count: Int): IntArray {
        val drafts = IntArray(count)
        var input = token
        for (i in 0 until count) {
            input = argmax(model.draftStep(position, input))
            drafts[i] = input
        }
        return drafts
    }

    override fun verify(position: Int, tokens: IntArray): IntArray =
        model.verify(position, tokens).map(::argmax).toIntArray()

    override fun accept(count: Int) = model.accept(count)
}
