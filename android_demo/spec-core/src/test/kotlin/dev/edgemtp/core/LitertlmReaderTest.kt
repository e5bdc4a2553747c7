package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.ByteArrayOutputStream
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Reads testdata/test_bundle.litertlm and compares it with test_bundle.expected.json, which
 * make_test_bundle.py wrote with the builder's own generated schema code.
 */
class LitertlmReaderTest {
    private val bundle = TestData.file("test_bundle.litertlm")
    private val expected = Json.parse(TestData.file("test_bundle.expected.json")).obj()
    private val bytes = bundle.readBytes()

    @Test
    fun `prefix fields match`() {
        val h = LitertlmReader.read(bundle)
        val v = expected["version"].ints()
        assertEquals(LitertlmVersion(v[0].toLong(), v[1].toLong(), v[2].toLong()), h.version)
        assertEquals(expected["header_end"].dbl().toLong(), h.headerEnd)
        assertEquals(expected["file_size"].dbl().toLong(), bundle.length())
    }

    @Test
    fun `sections match the builder's own reading`() {
        val sections = LitertlmReader.read(bundle).sections
        val want = expected["sections"].list().map { it.obj() }
        assertEquals(want.size, sections.size)
        for ((i, w) in want.withIndex()) {
            val s = sections[i]
            assertEquals("section $i index", i, s.index)
            assertEquals("section $i type", w["data_type"].int(), s.dataType)
            assertEquals("section $i begin", (w["begin"] as Number).toLong(), s.begin)
            assertEquals("section $i end", (w["end"] as Number).toLong(), s.end)
            assertItems("section $i", w["items"].obj(), s.items)
        }
    }

    @Test
    fun `system metadata matches the builder's own reading`() {
        assertItems("system", expected["system_metadata"].obj(), LitertlmReader.read(bundle).systemMetadata)
    }

    @Test
    fun `an MTP bundle has the models LiteRT-LM needs, each a TFLite flatbuffer on a 16 KiB boundary`() {
        val h = LitertlmReader.read(bundle)
        assertTrue(h.supportsSpeculativeDecoding)
        for (type in listOf(ModelTypes.PREFILL_DECODE, ModelTypes.EMBEDDER, ModelTypes.MTP_DRAFTER)) {
            val section = h.model(type) ?: throw AssertionError("no $type section")
            assertEquals("$type alignment", 0L, section.begin % 16384)
            val data = LitertlmReader.readSection(bundle, section)
            assertEquals("$type identifier", "TFL3", String(data, 4, 4, Charsets.US_ASCII))
        }
        assertEquals(SectionType.TFLITE_MODEL, h.model(ModelTypes.MTP_DRAFTER)!!.type)
        assertEquals(1, h.sectionsOf(SectionType.LLM_METADATA).size)
    }

    @Test
    fun `without a drafter section a bundle does not support speculative decoding`() {
        val h = LitertlmReader.read(bundle)
        val withoutDrafter = LitertlmHeader(h.version, h.headerEnd, h.systemMetadata, h.sections.filter { it.modelType != ModelTypes.MTP_DRAFTER })
        assertEquals(false, withoutDrafter.supportsSpeculativeDecoding)
    }

    @Test
    fun `LlmMetadata section decodes like protobuf does`() {
        val h = LitertlmReader.read(bundle)
        val m = LlmMetadata.parse(LitertlmReader.readSection(bundle, h.sectionsOf(SectionType.LLM_METADATA).single()))
        val w = expected["llm_metadata"].obj()
        assertEquals(w["start_token_ids"].ints().toList(), m.startTokenIds)
        assertEquals(w["stop_token_ids"].list().map { it.ints().toList() }, m.stopTokenIds)
        assertEquals(w["stop_token_strings"].list(), m.stopTokenStrings)
        assertEquals(w["max_num_tokens"].int(), m.maxNumTokens)
        assertEquals(w["model_type_field"].int(), m.modelTypeField)
    }

    @Test
    fun `copySection streams the same bytes as readSection`() {
        val h = LitertlmReader.read(bundle)
        for (section in h.sections) {
            val out = ByteArrayOutputStream()
            LitertlmReader.copySection(bundle, section, out)
            assertArrayEquals(LitertlmReader.readSection(bundle, section), out.toByteArray())
            assertArrayEquals(bytes.copyOfRange(section.begin.toInt(), section.end.toInt()), out.toByteArray())
        }
    }

    @Test
    fun `parsing bytes and reading the file agree`() {
        assertEquals(LitertlmReader.read(bundle).sections, LitertlmReader.parse(bytes).sections)
    }

    @Test
    fun `a file that is not a bundle is named as such`() {
        val bad = bytes.copyOf().also { "NOTALITE".toByteArray().copyInto(it) }
        expectError(bad, "not a .litertlm file")
    }

    @Test
    fun `truncated files give a clear message`() {
        val h = LitertlmReader.read(bundle)
        expectError(bytes.copyOf(20), "truncated")
        expectError(bytes.copyOf(h.headerEnd.toInt() - 1), "truncated: the header ends at byte ${h.headerEnd}")
        val last = h.sections.last()
        expectError(bytes.copyOf(last.end.toInt() - 1), "truncated: section ${last.index}")
    }

    @Test
    fun `truncated files on disk give the file's name`() {
        val file = File.createTempFile("truncated", ".litertlm")
        try {
            file.writeBytes(bytes.copyOf(bytes.size - 10))
            LitertlmReader.read(file)
            fail("read a truncated file")
        } catch (e: LitertlmFormatException) {
            assertTrue(e.message!!, e.message!!.startsWith(file.name) && "truncated" in e.message!!)
        } finally {
            file.delete()
        }
        try {
            LitertlmReader.read(File("/nonexistent/model.litertlm"))
            fail("read a missing file")
        } catch (e: LitertlmFormatException) {
            assertTrue(e.message!!, "no such file" in e.message!!)
        }
    }

    @Test
    fun `corrupt header offsets give a clear message`() {
        val hugeEnd = bytes.copyOf().also { ByteBuffer.wrap(it).order(ByteOrder.LITTLE_ENDIAN).putLong(24, 1L shl 40) }
        expectError(hugeEnd, "implausible")
        val badRoot = bytes.copyOf().also { ByteBuffer.wrap(it).order(ByteOrder.LITTLE_ENDIAN).putInt(32, 0x7FFFFFF0) }
        expectError(badRoot, "corrupt header flatbuffer")
    }

    @Test
    fun `any single corrupted header byte gives a parse or a LitertlmFormatException, nothing else`() {
        val end = LitertlmReader.read(bundle).headerEnd.toInt()
        for (at in 32 until end) for (value in intArrayOf(0xFF, 0x80, 0x00)) {
            val bad = bytes.copyOf().also { it[at] = value.toByte() }
            try {
                LitertlmReader.parse(bad)
            } catch (e: LitertlmFormatException) {
                // expected for most positions
            } catch (e: Exception) {
                throw AssertionError("byte $at = $value: ${e::class.simpleName}: ${e.message}", e)
            }
        }
    }

    private fun expectError(data: ByteArray, fragment: String) {
        try {
            LitertlmReader.parse(data, "bundle.litertlm")
            fail("parsed a broken bundle; expected '$fragment'")
        } catch (e: LitertlmFormatException) {
            assertTrue("'${e.message}' should contain '$fragment'", fragment in e.message!!)
            assertTrue(e.message!!, e.message!!.startsWith("bundle.litertlm: "))
        }
    }

    private fun assertItems(where: String, want: Map<String, Any?>, got: Map<String, Any>) {
        assertEquals("$where keys", want.keys, got.keys)
        for ((key, w) in want) {
            val value = w.obj()["value"]
            val actual = got.getValue(key)
            when (value) {
                is String, is Boolean -> assertEquals("$where $key", value, actual)
                is Number -> assertEquals("$where $key", value.toDouble(), (actual as Number).toDouble(), 1e-6)
                else -> fail("$where $key: unexpected expected value $value")
            }
        }
    }
}
