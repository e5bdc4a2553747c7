package dev.edgemtp.demo.engine

import dev.edgemtp.core.LitertlmFormatException
import dev.edgemtp.core.LitertlmHeader
import dev.edgemtp.core.LitertlmReader
import dev.edgemtp.core.ModelTypes
import dev.edgemtp.core.SectionType
import java.io.File

/** The raw `.tflite` models of a bundle, unpacked for LiteRT CompiledModel (which needs files). */
data class UnpackedModels(
    val target: File,
    val embedder: File,
    val perLayerEmbedder: File?,
    val drafter: File?,
)

/** Unpacks the TFLiteModel sections of a `.litertlm` bundle with spec-core's reader. */
object BundleFiles {
    /**
     * Writes each model of [bundle] once under [workDir] (keyed by the bundle's name, size and date)
     * and returns their paths. Writes are atomic: an interrupted unpack leaves no partial model.
     */
    fun unpack(bundle: File, header: LitertlmHeader, workDir: File): UnpackedModels {
        if (header.sectionsOf(SectionType.TFLITE_WEIGHTS).isNotEmpty()) {
            throw LitertlmFormatException(
                "${bundle.name} keeps weights in separate TFLiteWeights sections, which the own-loop path cannot load; use LiteRT-LM",
            )
        }
        val dir = File(workDir, "unpacked/${bundle.nameWithoutExtension}-${bundle.length()}-${bundle.lastModified()}")
        dir.mkdirs()
        fun model(type: String, required: Boolean): File? {
            val section = header.model(type)
                ?: if (required) throw LitertlmFormatException("${bundle.name} has no $type model") else return null
            val out = File(dir, "$type.tflite")
            if (out.length() != section.size) {
                val tmp = File(dir, "$type.tflite.part")
                tmp.outputStream().buffered().use { LitertlmReader.copySection(bundle, section, it) }
                check(tmp.renameTo(out)) { "cannot write $out" }
            }
            return out
        }
        return UnpackedModels(
            target = model(ModelTypes.PREFILL_DECODE, required = true)!!,
            embedder = model(ModelTypes.EMBEDDER, required = true)!!,
            perLayerEmbedder = model(ModelTypes.PER_LAYER_EMBEDDER, required = false),
            drafter = model(ModelTypes.MTP_DRAFTER, required = false),
        )
    }
}
