package dev.edgemtp.core

import java.io.IOException

/** A `.litertlm` file that cannot be read; the message names the problem in one sentence. */
class LitertlmFormatException(message: String) : IOException(message)

/** Section data types of the LiteRT-LM header schema (`AnySectionDataType`), as written by builder 0.18.1. */
enum class SectionType(val code: Int, val schemaName: String) {
    GENERIC_BINARY_DATA(1, "GenericBinaryData"),
    DEPRECATED(2, "Deprecated"),
    TFLITE_MODEL(3, "TFLiteModel"),
    SP_TOKENIZER(4, "SP_Tokenizer"),
    LLM_METADATA(5, "LlmMetadataProto"),
    HF_TOKENIZER_ZLIB(6, "HF_Tokenizer_Zlib"),
    TFLITE_WEIGHTS(7, "TFLiteWeights"),
    EMBEDDING_METADATA(8, "EmbeddingMetadataProto"),
    EXECUTOR_METADATA(9, "ExecutorMetadataProto"),
    TTS_METADATA(10, "TtsMetadataProto"),
    ASR_METADATA(11, "AsrMetadataProto");

    companion object {
        /** The type with [code], or null for a code this reader does not know. */
        fun of(code: Int): SectionType? = entries.firstOrNull { it.code == code }
    }
}

/** `model_type` values of TFLiteModel sections that matter for MTP. */
object ModelTypes {
    const val PREFILL_DECODE = "tf_lite_prefill_decode"
    const val EMBEDDER = "tf_lite_embedder"
    const val PER_LAYER_EMBEDDER = "tf_lite_per_layer_embedder"
    const val MTP_DRAFTER = "tf_lite_mtp_drafter"
    const val MTP_AUX = "tf_lite_mtp_aux"
}

/**
 * One section: bytes `[begin, end)` of the file, its [dataType] code and its key/value [items]
 * (values are String, Int, Long, Float, Double or Boolean according to their stored type).
 */
data class Section(
    val index: Int,
    val dataType: Int,
    val begin: Long,
    val end: Long,
    val items: Map<String, Any>,
) {
    /** The known type of [dataType], or null. */
    val type: SectionType? get() = SectionType.of(dataType)

    /** Size in bytes. */
    val size: Long get() = end - begin

    /** The `model_type` item of a TFLiteModel section, e.g. [ModelTypes.MTP_DRAFTER]. */
    val modelType: String? get() = items["model_type"] as? String

    /** A one-line description, e.g. `#2 TFLiteModel [49152, 50000) model_type=tf_lite_mtp_drafter`. */
    override fun toString(): String {
        val name = type?.schemaName ?: "type $dataType"
        val kv = items.entries.joinToString(" ") { "${it.key}=${it.value}" }
        return "#$index $name [$begin, $end)" + if (kv.isEmpty()) "" else " $kv"
    }
}

/** The container version written after the magic bytes. */
data class LitertlmVersion(val major: Long, val minor: Long, val patch: Long) {
    override fun toString(): String = "$major.$minor.$patch"
}

/** The parsed header of a `.litertlm` file. */
class LitertlmHeader(
    val version: LitertlmVersion,
    /** Byte offset where the header flatbuffer ends. */
    val headerEnd: Long,
    /** File-wide key/value metadata (the builder writes `uuid` and `creation_timestamp`). */
    val systemMetadata: Map<String, Any>,
    val sections: List<Section>,
) {
    /** Sections of the given [type], in file order. */
    fun sectionsOf(type: SectionType): List<Section> = sections.filter { it.dataType == type.code }

    /** The TFLiteModel section whose `model_type` is [modelType], or null. */
    fun model(modelType: String): Section? =
        sectionsOf(SectionType.TFLITE_MODEL).firstOrNull { it.modelType == modelType }

    /** LiteRT-LM's rule: a `tf_lite_mtp_drafter` model plus an LlmMetadata section. No flag is involved. */
    val supportsSpeculativeDecoding: Boolean
        get() = model(ModelTypes.MTP_DRAFTER) != null && sectionsOf(SectionType.LLM_METADATA).isNotEmpty()
}
