package dev.edgemtp.core

import java.io.File

/** Typed accessors for parsed JSON objects. */
@Suppress("UNCHECKED_CAST")
fun Any?.obj(): Map<String, Any?> = this as Map<String, Any?>

@Suppress("UNCHECKED_CAST")
fun Any?.list(): List<Any?> = this as List<Any?>

fun Any?.int(): Int = (this as Number).toInt()

fun Any?.dbl(): Double = (this as Number).toDouble()

fun Any?.ints(): IntArray = list().map { it.int() }.toIntArray()

/** The spec-core testdata folder: `-Dedgemtp.testdata=...`, else found from the working directory. */
object TestData {
    val dir: File by lazy {
        System.getProperty("edgemtp.testdata")?.let { return@lazy File(it) }
        listOf("testdata", "spec-core/testdata", "android_demo/spec-core/testdata")
            .map(::File).firstOrNull { File(it, "vectors.json").isFile }
            ?: error("spec-core testdata not found: set -Dedgemtp.testdata")
    }

    fun file(name: String): File = File(dir, name)
}
