package dev.edgemtp.core

/**
 * A minimal protobuf wire-format reader over [bytes]: enough to pull a few fields out of the
 * LlmMetadata section without generated code. Malformed input throws [LitertlmFormatException].
 */
class ProtoReader(private val bytes: ByteArray, private var pos: Int = 0, private val end: Int = bytes.size) {
    /** One field: its number, wire type, and payload (varint value, or the bytes of a length-delimited field). */
    class Field(val number: Int, val wireType: Int, val varint: Long, val payload: ByteArray?)

    /** Reads every remaining field in order; unknown 32/64-bit fields are returned with their raw bytes. */
    fun fields(): List<Field> {
        val out = ArrayList<Field>()
        while (pos < end) {
            val key = varint()
            val number = (key ushr 3).toInt()
            when (val wire = (key and 7).toInt()) {
                0 -> out += Field(number, wire, varint(), null)
                1 -> out += Field(number, wire, 0, take(8))
                2 -> out += Field(number, wire, 0, take(varint().toIntChecked()))
                5 -> out += Field(number, wire, 0, take(4))
                else -> malformed("unsupported wire type $wire for field $number")
            }
        }
        return out
    }

    /** Reads varints until the end (a packed repeated integer field). */
    fun packedVarints(): List<Long> {
        val out = ArrayList<Long>()
        while (pos < end) out += varint()
        return out
    }

    private fun varint(): Long {
        var result = 0L
        var shift = 0
        while (true) {
            if (pos >= end) malformed("truncated varint")
            val b = bytes[pos++].toInt()
            result = result or ((b and 0x7F).toLong() shl shift)
            if (b and 0x80 == 0) return result
            shift += 7
            if (shift >= 64) malformed("varint longer than 10 bytes")
        }
    }

    private fun take(n: Int): ByteArray {
        if (n < 0 || pos + n > end) malformed("field of $n bytes runs past the end")
        return bytes.copyOfRange(pos, pos + n).also { pos += n }
    }

    private fun Long.toIntChecked(): Int = if (this in 0..Int.MAX_VALUE) toInt() else malformed("length $this")

    private fun malformed(detail: String): Nothing = throw LitertlmFormatException("malformed protobuf: $detail")
}
