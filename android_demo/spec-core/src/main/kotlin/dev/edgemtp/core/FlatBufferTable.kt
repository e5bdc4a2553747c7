package dev.edgemtp.core

import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Read-only access to one table of a FlatBuffer, enough for the `.litertlm` header; every offset is
 * bounds-checked so a corrupt header fails with a [LitertlmFormatException] instead of garbage.
 *
 * Layout: the buffer starts with a uint32 offset to the root table; a table starts with an int32
 * `soffset` (the vtable sits at `table - soffset`); a vtable is uint16 vtable size, uint16 table
 * size, then one uint16 per field id giving the field's offset inside the table (0 = absent).
 * Offsets to tables, strings and vectors are uint32 relative to where they are stored; strings and
 * vectors begin with a uint32 length.
 */
class FlatBufferTable private constructor(private val buf: ByteBuffer, private val pos: Int) {
    private val vtable: Int = run {
        val vt = pos - int32(pos)
        if (vt < 0 || vt + 4 > buf.limit()) corrupt("vtable of table at $pos points outside the header ($vt)")
        vt
    }

    /** Absolute position of field [id], or -1 when the field is absent. */
    private fun fieldPos(id: Int): Int {
        val entry = 4 + 2 * id
        if (entry >= uint16(vtable)) return -1
        val offset = uint16(vtable + entry)
        return if (offset == 0) -1 else pos + offset
    }

    /** True when field [id] is present. */
    fun has(id: Int): Boolean = fieldPos(id) >= 0

    /** Unsigned 8-bit field [id], or [default]. */
    fun uint8(id: Int, default: Int = 0): Int = fieldPos(id).let { if (it < 0) default else byteAt(it).toInt() and 0xFF }

    /** Signed 8-bit field [id], or [default]. */
    fun int8(id: Int, default: Int = 0): Int = fieldPos(id).let { if (it < 0) default else byteAt(it).toInt() }

    /** Unsigned 16-bit field [id], or [default]. */
    fun uint16(id: Int, default: Int = 0): Int = fieldPos(id).let { if (it < 0) default else uint16(it) }

    /** Signed 16-bit field [id], or [default]. */
    fun int16(id: Int, default: Int = 0): Int = fieldPos(id).let { if (it < 0) default else check(it, 2).getShort(it).toInt() }

    /** Signed 32-bit field [id], or [default]. */
    fun int32(id: Int, default: Int = 0): Int = fieldPos(id).let { if (it < 0) default else int32(it) }

    /** Unsigned 32-bit field [id] as a Long, or [default]. */
    fun uint32(id: Int, default: Long = 0): Long = fieldPos(id).let { if (it < 0) default else int32(it).toLong() and 0xFFFFFFFFL }

    /** 64-bit field [id] (unsigned values above Long.MAX_VALUE wrap), or [default]. */
    fun int64(id: Int, default: Long = 0): Long = fieldPos(id).let { if (it < 0) default else check(it, 8).getLong(it) }

    /** 32-bit float field [id], or [default]. */
    fun float32(id: Int, default: Float = 0f): Float = fieldPos(id).let { if (it < 0) default else check(it, 4).getFloat(it) }

    /** 64-bit float field [id], or [default]. */
    fun float64(id: Int, default: Double = 0.0): Double = fieldPos(id).let { if (it < 0) default else check(it, 8).getDouble(it) }

    /** Boolean field [id], or [default]. */
    fun bool(id: Int, default: Boolean = false): Boolean = fieldPos(id).let { if (it < 0) default else byteAt(it).toInt() != 0 }

    /** UTF-8 string field [id], or null when absent. */
    fun string(id: Int): String? {
        val at = target(id) ?: return null
        val length = int32(at)
        if (length < 0 || at + 4 + length > buf.limit()) corrupt("string at $at of length $length runs past the header")
        val bytes = ByteArray(length)
        buf.duplicate().apply { position(at + 4) }.get(bytes)
        return bytes.toString(Charsets.UTF_8)
    }

    /** Sub-table field [id], or null when absent. */
    fun table(id: Int): FlatBufferTable? = target(id)?.let { FlatBufferTable(buf, it) }

    /** Vector-of-tables field [id]; empty when absent. */
    fun tables(id: Int): List<FlatBufferTable> {
        val at = target(id) ?: return emptyList()
        val count = int32(at)
        if (count < 0 || at + 4 + 4L * count > buf.limit()) corrupt("vector at $at of $count entries runs past the header")
        return List(count) { i ->
            val element = at + 4 + 4 * i
            FlatBufferTable(buf, offsetTarget(element))
        }
    }

    /** Where the uint32 offset stored in field [id] points, or null when absent. */
    private fun target(id: Int): Int? = fieldPos(id).let { if (it < 0) null else offsetTarget(it) }

    private fun offsetTarget(at: Int): Int {
        val target = at.toLong() + (int32(at).toLong() and 0xFFFFFFFFL)
        if (target + 4 > buf.limit()) corrupt("offset at $at points outside the header ($target)")
        return target.toInt()
    }

    private fun byteAt(at: Int): Byte = check(at, 1).get(at)

    private fun uint16(at: Int): Int = check(at, 2).getShort(at).toInt() and 0xFFFF

    private fun int32(at: Int): Int = check(at, 4).getInt(at)

    private fun check(at: Int, size: Int): ByteBuffer {
        if (at < 0 || at + size > buf.limit()) corrupt("read of $size bytes at $at is outside the ${buf.limit()}-byte header")
        return buf
    }

    companion object {
        /** The root table of the FlatBuffer in [bytes] (no file identifier expected). */
        fun root(bytes: ByteArray): FlatBufferTable {
            val buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
            if (bytes.size < 8) corrupt("a ${bytes.size}-byte header is too small to hold a FlatBuffer")
            val root = buf.getInt(0).toLong() and 0xFFFFFFFFL
            if (root + 4 > bytes.size) corrupt("root table offset $root is outside the ${bytes.size}-byte header")
            return FlatBufferTable(buf, root.toInt())
        }

        private fun corrupt(detail: String): Nothing = throw LitertlmFormatException("corrupt header flatbuffer: $detail")
    }
}
