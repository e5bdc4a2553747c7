package dev.edgemtp.core

/**
 * The fields of LiteRT-LM's `LlmMetadata` proto that a decoding loop needs. Field numbers:
 * 1 start_token, 2 stop_tokens (repeated), 5 max_num_tokens, 6 llm_model_type (a oneof whose field
 * number names the family: 1 generic_model, 8 gemma4, ...), 11 supports_thinking,
 * 12 supports_function_calling. A token is a `TokenUnion { 1: TokenIds { 1: repeated int32 ids }, 2: string }`.
 */
data class LlmMetadata(
    /** Ids of the start token (usually one; empty when given as a string). */
    val startTokenIds: List<Int>,
    /** Each stop token's ids; a stop token given only as a string is left out. */
    val stopTokenIds: List<List<Int>>,
    /** Stop tokens given as strings. */
    val stopTokenStrings: List<String>,
    /** The context length the bundle was built for (0 when absent). */
    val maxNumTokens: Int,
    /** Field number of the set `llm_model_type` oneof (8 = gemma4), or 0. */
    val modelTypeField: Int,
) {
    /** Single-id stop tokens, the set a token-level loop can check. */
    val stopTokens: Set<Int> get() = stopTokenIds.filter { it.size == 1 }.map { it[0] }.toSet()

    companion object {
        /** Decodes the bytes of an LlmMetadataProto section. */
        fun parse(bytes: ByteArray): LlmMetadata {
            var start = emptyList<Int>()
            val stopIds = ArrayList<List<Int>>()
            val stopStrings = ArrayList<String>()
            var maxTokens = 0
            var modelType = 0
            for (f in ProtoReader(bytes).fields()) {
                when (f.number) {
                    1 -> start = tokenIds(f.bytes())
                    2 -> tokenString(f.bytes())?.let { stopStrings += it } ?: run { stopIds += tokenIds(f.bytes()) }
                    5 -> maxTokens = f.varint.toInt()
                    6 -> modelType = ProtoReader(f.bytes()).fields().firstOrNull()?.number ?: 0
                }
            }
            return LlmMetadata(start, stopIds, stopStrings, maxTokens, modelType)
        }

        private fun ProtoReader.Field.bytes(): ByteArray =
            payload ?: throw LitertlmFormatException("malformed LlmMetadata: field $number is not a message")

        /** Ids of a TokenUnion; packed and unpacked encodings are both accepted. */
        private fun tokenIds(union: ByteArray): List<Int> {
            val ids = ArrayList<Int>()
            for (f in ProtoReader(union).fields()) {
                if (f.number != 1) continue
                for (g in ProtoReader(f.bytes()).fields()) {
                    if (g.number != 1) continue
                    if (g.wireType == 0) ids += g.varint.toInt()
                    else ids += ProtoReader(g.bytes()).packedVarints().map { it.toInt() }
                }
            }
            return ids
        }

        private fun tokenString(union: ByteArray): String? =
            ProtoReader(union).fields().firstOrNull { it.number == 2 }?.bytes()?.toString(Charsets.UTF_8)
    }
}
