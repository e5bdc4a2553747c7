package dev.edgemtp.core

import org.junit.Assert.assertEquals
import org.junit.Assert.fail
import org.junit.Test

class JsonTest {
    @Test
    fun `parses nested values, numbers and escapes`() {
        val doc = Json.parse("""{"a": [1, -2.5, 3e2, true, false, null], "s": "x\"\\\n\u2581\u00e9", "o": {}}""").obj()
        assertEquals(listOf(1L, -2.5, 300.0, true, false, null), doc["a"])
        assertEquals("x\"\\\n\u2581\u00e9", doc["s"])
        assertEquals(emptyMap<String, Any?>(), doc["o"])
    }

    @Test
    fun `malformed documents are refused`() {
        for (bad in listOf("{", "[1,", "\"abc", "{\"a\" 1}", "[1] 2", "\"\\u12\"", "tru")) {
            try {
                Json.parse(bad)
                fail("parsed $bad")
            } catch (e: IllegalArgumentException) {
                // expected
            } catch (e: StringIndexOutOfBoundsException) {
                throw AssertionError("$bad: ${e.message}", e)
            }
        }
    }
}
