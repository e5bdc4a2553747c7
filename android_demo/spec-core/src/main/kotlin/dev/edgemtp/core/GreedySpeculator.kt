package dev.edgemtp.core

/**
 * Length of the longest prefix of [drafts] that the target agrees with: `d_i == v_{i-1}` for
 * `i = 1..k`, where [targetArgmax] holds `v_0..v_G`.
 */
fun acceptedPrefix(drafts: IntArray, targetArgmax: IntArray): Int {
    require(targetArgmax.size == drafts.size + 1) {
        "verify returned ${targetArgmax.size} rows for ${drafts.size} drafts; expected ${drafts.size + 1}"
    }
    var k = 0
    while (k < drafts.size && drafts[k] == targetArgmax[k]) k++
    return k
}

/** LiteRT-LM's greedy rule: keep the agreeing prefix, then emit the target's token `v_k` as the bonus. */
class GreedySpeculator(private val model: MtpModel) : Speculator {
    override val contextLength: Int get() = model.contextLength

    override fun prefill(tokens: IntArray) = model.prefill(tokens)

    override fun decode(position: Int, token: Int): Int = model.decode(position, token)

    override fun draft(position: Int, token: Int, count: Int): IntArray = model.draft(position, token, count)

    override fun verify(position: Int, token: Int, drafts: IntArray): Verdict {
        val rows = model.verify(position, intArrayOf(token) + drafts)
        val k = acceptedPrefix(drafts, rows)
        model.accept(k)
        return Verdict(k, rows[k])
    }
}
