package dev.edgemtp.core

import java.io.ByteArrayOutputStream
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.zip.Inflater

/**
 * A SentencePiece-style BPE tokenizer read from a Hugging Face `tokenizer.json` (the Gemma kind):
 * spaces become `▁`, merges apply by rank, characters outside the vocabulary fall back to `<0xXX>`
 * byte tokens, and added (special) tokens such as `<start_of_turn>` are matched literally first.
 * It covers what the demo needs to feed a prompt and stream text; it is not a full `tokenizers` port.
 */
class BpeTokenizer(
    private val vocab: Map<String, Int>,
    merges: List<Pair<String, String>>,
    private val addedTokens: Map<String, Int> = emptyMap(),
    private val unkId: Int? = null,
) {
    private val ranks: Map<Pair<String, String>, Int> = merges.withIndex().associate { it.value to it.index }
    private val pieces: Map<Int, String> = (vocab + addedTokens).entries.associate { it.value to it.key }
    private val specialIds: Set<Int> = addedTokens.values.toSet()
    private val addedByLength = addedTokens.keys.filter { it.isNotEmpty() }.sortedByDescending { it.length }
    private val addedFirstChars = addedByLength.map { it[0] }.toSet()

    /** Vocabulary size (largest id + 1). */
    val size: Int get() = (pieces.keys.maxOrNull() ?: -1) + 1

    /** The id of [piece], or null. */
    fun id(piece: String): Int? = addedTokens[piece] ?: vocab[piece]

    /** Token ids of [text]. */
    fun encode(text: String): IntArray {
        val out = ArrayList<Int>()
        var start = 0
        var i = 0
        while (i < text.length) {
            val special = if (text[i] in addedFirstChars) addedByLength.firstOrNull { text.startsWith(it, i) } else null
            if (special == null) { i++; continue }
            encodePlain(text.substring(start, i), out)
            out += addedTokens.getValue(special)
            i += special.length
            start = i
        }
        encodePlain(text.substring(start), out)
        return out.toIntArray()
    }

    /** Text of [ids]; byte tokens are reassembled as UTF-8 and special tokens are dropped unless [keepSpecial]. */
    fun decode(ids: IntArray, keepSpecial: Boolean = false): String {
        val sb = StringBuilder()
        val bytes = ByteArrayOutputStream()
        fun flush() { if (bytes.size() > 0) { sb.append(bytes.toString(Charsets.UTF_8.name())); bytes.reset() } }
        for (id in ids) {
            val piece = pieces[id] ?: continue
            val byte = byteValue(piece)
            if (byte != null) { bytes.write(byte); continue }
            flush()
            if (id in specialIds && !keepSpecial) continue
            sb.append(piece.replace(SPACE, ' '))
        }
        flush()
        return sb.toString()
    }

    private fun encodePlain(text: String, out: MutableList<Int>) {
        if (text.isEmpty()) return
        val symbols = ArrayList<String>()
        for (ch in text.replace(' ', SPACE).codePoints().toArray().map { String(Character.toChars(it)) }) {
            if (ch in vocab) symbols += ch
            else {
                val fallback = ch.toByteArray(Charsets.UTF_8).map { "<0x%02X>".format(it.toInt() and 0xFF) }
                if (fallback.all { it in vocab }) symbols += fallback
                else symbols += ch // becomes unk below
            }
        }
        while (symbols.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (j in 0 until symbols.size - 1) {
                val rank = ranks[symbols[j] to symbols[j + 1]] ?: continue
                if (rank < bestRank) { bestRank = rank; best = j }
            }
            if (best < 0) break
            symbols[best] = symbols[best] + symbols[best + 1]
            symbols.removeAt(best + 1)
        }
        for (s in symbols) out += vocab[s] ?: unkId ?: throw IllegalArgumentException("'$s' is not in the vocabulary and there is no <unk>")
    }

    companion object {
        private const val SPACE = '\u2581'

        private fun byteValue(piece: String): Int? =
            if (piece.length == 6 && piece.startsWith("<0x") && piece.endsWith(">")) piece.substring(3, 5).toIntOrNull(16) else null

        /** Builds a tokenizer from the text of a `tokenizer.json`. */
        fun fromJson(text: String): BpeTokenizer {
            val root = Json.parse(text) as? Map<*, *> ?: throw IllegalArgumentException("tokenizer.json is not an object")
            val model = root["model"] as? Map<*, *> ?: throw IllegalArgumentException("tokenizer.json has no model")
            require(model["type"] == null || model["type"] == "BPE") { "only BPE tokenizers are supported, not ${model["type"]}" }
            val vocab = (model["vocab"] as Map<*, *>).entries.associate { it.key as String to (it.value as Number).toInt() }
            val merges = (model["merges"] as? List<*>).orEmpty().map { m ->
                when (m) {
                    is String -> m.substringBefore(' ') to m.substringAfter(' ')
                    is List<*> -> m[0] as String to m[1] as String
                    else -> throw IllegalArgumentException("unreadable merge $m")
                }
            }
            val added = (root["added_tokens"] as? List<*>).orEmpty().associate {
                val t = it as Map<*, *>
                t["content"] as String to (t["id"] as Number).toInt()
            }
            val unk = (model["unk_token"] as? String)?.let { vocab[it] }
            return BpeTokenizer(vocab, merges, added, unk)
        }

        /** Reads the HF_Tokenizer_Zlib section of a bundle: a uint64 LE size, then zlib(tokenizer.json). */
        fun fromBundle(file: File, header: LitertlmHeader): BpeTokenizer {
            val section = header.sectionsOf(SectionType.HF_TOKENIZER_ZLIB).firstOrNull()
                ?: throw LitertlmFormatException("${file.name}: no HF tokenizer section (a SentencePiece-only bundle is not supported here)")
            return fromJson(inflate(LitertlmReader.readSection(file, section), file.name))
        }

        /** Decompresses an HF_Tokenizer_Zlib section into the tokenizer.json text. */
        fun inflate(data: ByteArray, name: String = "bundle"): String {
            if (data.size < 8) throw LitertlmFormatException("$name: tokenizer section is truncated")
            val size = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN).getLong(0)
            if (size < 0 || size > Int.MAX_VALUE) throw LitertlmFormatException("$name: tokenizer size $size is implausible")
            val out = ByteArray(size.toInt())
            val inflater = Inflater()
            try {
                inflater.setInput(data, 8, data.size - 8)
                var n = 0
                while (n < out.size && !inflater.finished()) {
                    val got = inflater.inflate(out, n, out.size - n)
                    if (got == 0 && (inflater.needsInput() || inflater.needsDictionary())) break
                    n += got
                }
                if (n != out.size) throw LitertlmFormatException("$name: tokenizer section inflates to $n bytes, expected $size")
            } catch (e: java.util.zip.DataFormatException) {
                throw LitertlmFormatException("$name: tokenizer section is not valid zlib data (${e.message})")
            } finally {
                inflater.end()
            }
            return out.toString(Charsets.UTF_8)
        }
    }
}
