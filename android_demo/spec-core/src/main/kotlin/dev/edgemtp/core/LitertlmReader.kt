package dev.edgemtp.core

import java.io.File
import java.io.OutputStream
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Reads the container of a `.litertlm` bundle without any FlatBuffers library.
 *
 * File layout: bytes 0-7 `LITERTLM`; major, minor, patch as uint32 LE at 8, 12, 16; at 24 a uint64
 * LE giving the end offset of the header FlatBuffer, which starts at byte 32. Header schema (field ids):
 * `LiteRTLMMetaData { 0: system_metadata: SystemMetadata, 1: section_metadata: SectionMetadata }`,
 * `SystemMetadata { 0: entries: [KeyValuePair] }`, `SectionMetadata { 0: objects: [SectionObject] }`,
 * `SectionObject { 0: items: [KeyValuePair], 1: begin_offset: uint64, 2: end_offset: uint64, 3: data_type: uint8 }`,
 * `KeyValuePair { 0: key: string, 1: value_type: uint8 (union tag), 2: value: table }`, where every
 * value table holds its scalar or string in field 0.
 */
object LitertlmReader {
    private val MAGIC = "LITERTLM".toByteArray(Charsets.US_ASCII)
    private const val PREFIX_SIZE = 32
    private const val MAX_HEADER = 64L * 1024 * 1024

    /** Parses the header of [file]. */
    fun read(file: File): LitertlmHeader {
        if (!file.isFile) throw LitertlmFormatException("$file: no such file")
        RandomAccessFile(file, "r").use { raf ->
            val length = raf.length()
            val prefix = ByteArray(minOf(length, PREFIX_SIZE.toLong()).toInt())
            raf.readFully(prefix)
            val headerEnd = headerEnd(prefix, length, file.name)
            val header = ByteArray((headerEnd - PREFIX_SIZE).toInt())
            raf.readFully(header)
            return parse(prefix, header, headerEnd, length, file.name)
        }
    }

    /** Parses the header of a bundle held entirely in [bytes]. */
    fun parse(bytes: ByteArray, name: String = "bundle"): LitertlmHeader {
        val prefix = bytes.copyOfRange(0, minOf(bytes.size, PREFIX_SIZE))
        val headerEnd = headerEnd(prefix, bytes.size.toLong(), name)
        return parse(prefix, bytes.copyOfRange(PREFIX_SIZE, headerEnd.toInt()), headerEnd, bytes.size.toLong(), name)
    }

    /** Reads the bytes of [section] from [file] (meant for small sections: metadata, tokenizers). */
    fun readSection(file: File, section: Section): ByteArray {
        require(section.size <= Int.MAX_VALUE) { "section ${section.index} is too large to read into memory" }
        return RandomAccessFile(file, "r").use { raf ->
            ByteArray(section.size.toInt()).also { raf.seek(section.begin); raf.readFully(it) }
        }
    }

    /** Streams the bytes of [section] from [file] to [out], e.g. to unpack a `.tflite` model. */
    fun copySection(file: File, section: Section, out: OutputStream) {
        RandomAccessFile(file, "r").use { raf ->
            raf.seek(section.begin)
            val buffer = ByteArray(1 shl 20)
            var left = section.size
            while (left > 0) {
                val n = raf.read(buffer, 0, minOf(left, buffer.size.toLong()).toInt())
                if (n < 0) throw LitertlmFormatException("${file.name}: truncated inside section ${section.index}")
                out.write(buffer, 0, n)
                left -= n
            }
        }
    }

    private fun headerEnd(prefix: ByteArray, length: Long, name: String): Long {
        if (length < PREFIX_SIZE) {
            throw LitertlmFormatException("$name: truncated: $length bytes, a .litertlm file needs at least $PREFIX_SIZE")
        }
        if (!prefix.copyOfRange(0, 8).contentEquals(MAGIC)) {
            throw LitertlmFormatException("$name: not a .litertlm file (the first 8 bytes are not \"LITERTLM\")")
        }
        val end = le(prefix).getLong(24)
        if (end <= PREFIX_SIZE + 4 || end - PREFIX_SIZE > MAX_HEADER) {
            throw LitertlmFormatException("$name: corrupt header: its end offset $end is implausible")
        }
        if (end > length) {
            throw LitertlmFormatException("$name: truncated: the header ends at byte $end but the file has $length bytes")
        }
        return end
    }

    private fun parse(prefix: ByteArray, header: ByteArray, headerEnd: Long, length: Long, name: String): LitertlmHeader {
        val p = le(prefix)
        val version = LitertlmVersion(p.uint32(8), p.uint32(12), p.uint32(16))
        val root = wrap(name) { FlatBufferTable.root(header) }
        val system = wrap(name) { root.table(0)?.tables(0)?.let(::keyValues) ?: emptyMap() }
        val objects = wrap(name) { root.table(1)?.tables(0) ?: emptyList() }
        val sections = objects.mapIndexed { index, obj ->
            val section = wrap(name) {
                Section(index, obj.uint8(3), obj.int64(1), obj.int64(2), keyValues(obj.tables(0)))
            }
            if (section.begin < headerEnd || section.end < section.begin) {
                throw LitertlmFormatException("$name: corrupt header: section $index has an invalid range [${section.begin}, ${section.end})")
            }
            if (section.end > length) {
                throw LitertlmFormatException(
                    "$name: truncated: section $index (${section.type?.schemaName ?: "type ${section.dataType}"}) " +
                        "ends at byte ${section.end} but the file has $length bytes",
                )
            }
            section
        }
        return LitertlmHeader(version, headerEnd, system, sections)
    }

    /** Decodes a vector of `KeyValuePair` tables; the union tags follow the schema's `VData`. */
    private fun keyValues(pairs: List<FlatBufferTable>): Map<String, Any> {
        val map = LinkedHashMap<String, Any>()
        for (pair in pairs) {
            val key = pair.string(0) ?: throw LitertlmFormatException("corrupt header flatbuffer: a key/value pair has no key")
            val v = pair.table(2) ?: continue
            map[key] = when (val tag = pair.uint8(1)) {
                1 -> v.uint8(0)
                2 -> v.int8(0)
                3 -> v.uint16(0)
                4 -> v.int16(0)
                5 -> v.uint32(0)
                6 -> v.int32(0)
                7 -> v.float32(0)
                8 -> v.bool(0)
                9 -> v.string(0) ?: ""
                10, 11 -> v.int64(0)
                12 -> v.float64(0)
                else -> throw LitertlmFormatException("corrupt header flatbuffer: item '$key' has unknown value type $tag")
            }
        }
        return map
    }

    private inline fun <T> wrap(name: String, block: () -> T): T = try {
        block()
    } catch (e: LitertlmFormatException) {
        throw LitertlmFormatException("$name: ${e.message}")
    }

    private fun le(bytes: ByteArray): ByteBuffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)

    private fun ByteBuffer.uint32(at: Int): Long = getInt(at).toLong() and 0xFFFFFFFFL
}
