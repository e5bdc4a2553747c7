package dev.edgemtp.core

import java.io.File

/**
 * A small JSON parser (for tokenizer.json and test fixtures): objects become `Map<String, Any?>`,
 * arrays `List<Any?>`, integers `Long`, other numbers `Double`. Malformed input throws
 * [IllegalArgumentException] naming the offset.
 */
class Json private constructor(private val text: String) {
    private var pos = 0

    private fun value(): Any? {
        skipSpace()
        return when (val c = peek()) {
            '{' -> obj()
            '[' -> array()
            '"' -> string()
            't' -> literal("true", true)
            'f' -> literal("false", false)
            'n' -> literal("null", null)
            else -> if (c == '-' || c.isDigit()) number() else fail("unexpected '$c'")
        }
    }

    private fun obj(): Map<String, Any?> {
        val map = LinkedHashMap<String, Any?>()
        expect('{')
        skipSpace()
        if (peek() == '}') { pos++; return map }
        while (true) {
            skipSpace()
            val key = string()
            skipSpace(); expect(':')
            map[key] = value()
            skipSpace()
            if (peek() == ',') { pos++; continue }
            expect('}')
            return map
        }
    }

    private fun array(): List<Any?> {
        val list = ArrayList<Any?>()
        expect('[')
        skipSpace()
        if (peek() == ']') { pos++; return list }
        while (true) {
            list += value()
            skipSpace()
            if (peek() == ',') { pos++; continue }
            expect(']')
            return list
        }
    }

    private fun string(): String {
        expect('"')
        val sb = StringBuilder()
        while (true) {
            if (pos >= text.length) fail("unterminated string")
            val c = text[pos++]
            when (c) {
                '"' -> return sb.toString()
                '\\' -> when (val e = if (pos < text.length) text[pos++] else fail("unterminated string")) {
                    'n' -> sb.append('\n'); 't' -> sb.append('\t'); 'r' -> sb.append('\r')
                    'b' -> sb.append('\b'); 'f' -> sb.append('\u000c')
                    'u' -> {
                        if (pos + 4 > text.length) fail("truncated \\u escape")
                        sb.append(text.substring(pos, pos + 4).toInt(16).toChar())
                        pos += 4
                    }
                    else -> sb.append(e)
                }
                else -> sb.append(c)
            }
        }
    }

    private fun number(): Any {
        val start = pos
        while (pos < text.length && (text[pos].isDigit() || text[pos] in "+-.eE")) pos++
        val s = text.substring(start, pos)
        return if (s.any { it in ".eE" }) s.toDouble() else s.toLong()
    }

    private fun literal(word: String, v: Any?): Any? {
        if (!text.startsWith(word, pos)) fail("expected $word")
        pos += word.length
        return v
    }

    private fun skipSpace() { while (pos < text.length && text[pos].isWhitespace()) pos++ }
    private fun peek(): Char = if (pos < text.length) text[pos] else fail("unexpected end")
    private fun expect(c: Char) { if (peek() != c) fail("expected '$c'"); pos++ }
    private fun fail(msg: String): Nothing = throw IllegalArgumentException("JSON: $msg at offset $pos")

    companion object {
        /** Parses one JSON document. */
        fun parse(text: String): Any? = Json(text).run { value().also { skipSpace(); if (pos != text.length) fail("trailing data") } }

        /** Parses a JSON file. */
        fun parse(file: File): Any? = parse(file.readText())
    }
}
