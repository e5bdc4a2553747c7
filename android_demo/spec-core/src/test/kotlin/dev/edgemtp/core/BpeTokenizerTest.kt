package dev.edgemtp.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class BpeTokenizerTest {
    private val bundle = TestData.file("test_bundle.litertlm")
    private val fromBundle: BpeTokenizer by lazy { BpeTokenizer.fromBundle(bundle, LitertlmReader.read(bundle)) }

    /** The fixture tokenizer of make_test_bundle.py, written inline so that these tests own it. */
    private val tiny: BpeTokenizer by lazy {
        val pieces = listOf("<pad>", "<eos>", "<bos>", "<unk>") + (0 until 256).map { "<0x%02X>".format(it) } +
            listOf("\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "\u2581w", "or", "<start_of_turn>")
        val vocab = pieces.withIndex().associate { it.value to it.index }
        val merges = listOf("h" to "e", "l" to "l", "he" to "ll", "hell" to "o", "\u2581" to "w", "o" to "r")
        BpeTokenizer(vocab, merges, mapOf("<bos>" to 2, "<start_of_turn>" to vocab.getValue("<start_of_turn>")), unkId = 3)
    }

    private fun ids(vararg pieces: String) = pieces.map { tiny.id(it)!! }.toIntArray()

    @Test
    fun `merges apply by rank`() {
        assertArrayEquals(ids("hello"), tiny.encode("hello"))
        assertArrayEquals(ids("hello", "\u2581w", "or", "l", "d"), tiny.encode("hello world"))
        assertArrayEquals(ids("ll", "o"), tiny.encode("llo"))
    }

    @Test
    fun `unknown characters fall back to UTF-8 byte tokens and decode back`() {
        val text = "hé ✓"
        val encoded = tiny.encode(text)
        assertArrayEquals(ids("h", "<0xC3>", "<0xA9>", "\u2581", "<0xE2>", "<0x9C>", "<0x93>"), encoded)
        assertEquals(text, tiny.decode(encoded))
    }

    @Test
    fun `added tokens are matched literally and dropped on decode unless kept`() {
        val encoded = tiny.encode("<start_of_turn>hello")
        assertArrayEquals(ids("<start_of_turn>", "hello"), encoded)
        assertEquals("hello", tiny.decode(encoded))
        assertEquals("<start_of_turn>hello", tiny.decode(encoded, keepSpecial = true))
    }

    @Test
    fun `the bundle's tokenizer section inflates and round-trips text`() {
        val text = "hello world, the MTP drafter!"
        assertEquals(text, fromBundle.decode(fromBundle.encode(text)))
        assertTrue(fromBundle.size >= 256)
    }

    @Test
    fun `a corrupt tokenizer section gives a clear message`() {
        try {
            BpeTokenizer.inflate(byteArrayOf(10, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3), "x.litertlm")
            fail("inflated garbage")
        } catch (e: LitertlmFormatException) {
            assertTrue(e.message!!, e.message!!.startsWith("x.litertlm: tokenizer section"))
        }
    }

    @Test
    fun `tokenizer json with string merges parses`() {
        val json = """{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}"""
        assertArrayEquals(intArrayOf(2, 0), BpeTokenizer.fromJson(json).encode("aba"))
    }
}
