package dev.edgemtp.demo.engine

import com.google.ai.edge.litert.Accelerator
import com.google.ai.edge.litert.CompiledModel
import com.google.ai.edge.litert.Environment
import com.google.ai.edge.litert.TensorBuffer
import com.google.ai.edge.litert.TensorType
import dev.edgemtp.core.MtpLogitsModel

/**
 * The I/O contract of an edge-mtp / LiteRT-LM bundle bound to LiteRT CompiledModel: target signatures
 * `prefill_<T>`, `decode`, `verify` (T = G+1), the `mtp_drafter` step, and the `embedder` /
 * `per_layer_embedder` lookups. Target and drafter share the same KV [TensorBuffer]s by name
 * (`kv_cache_k_<i>`, `kv_cache_v_<i>`), updated in place; this class only runs named signatures on
 * named buffers, the speculation itself is spec-core's.
 */
class LiteRtMtpModel(models: UnpackedModels, accel: Accel) : MtpLogitsModel, AutoCloseable {
    private val env = Environment.create()
    private val options = CompiledModel.Options(accel.toLiteRt())
    private val cpu = CompiledModel.Options(Accelerator.CPU)
    private val target = CompiledModel.create(models.target.path, options, env)
    private val embedder = Lookup(CompiledModel.create(models.embedder.path, cpu, env))
    private val perLayerEmbedder = models.perLayerEmbedder?.let { Lookup(CompiledModel.create(it.path, cpu, env)) }
    private val drafter = models.drafter?.let { CompiledModel.create(it.path, options, env) }

    /** One buffer per KV tensor, shared by every target signature and by the drafter. */
    private val kv: Map<String, TensorBuffer> = generateSequence(0) { it + 1 }
        .takeWhile { target.hasInput("kv_cache_k_$it", DECODE) }
        .flatMap { sequenceOf("kv_cache_k_$it", "kv_cache_v_$it") }
        .associateWith { target.createInputBuffer(it, DECODE) }

    override val contextLength: Int = target.dims("mask", DECODE).last()
    private val hidden: Int = target.dims("embeddings", DECODE).last()

    /** Drafts per round, fixed by the shape of the `verify` signature (0 when the bundle has no drafter). */
    val draftLength: Int =
        if (drafter != null && target.hasInput("input_pos", VERIFY)) target.dims("input_pos", VERIFY)[0] - 1 else 0

    private val decodeStep = TargetStep(DECODE)
    private val verifyStep = if (draftLength > 0) TargetStep(VERIFY) else null
    private val prefillSteps = PREFILL_LENGTHS.filter { target.hasInput("input_pos", "prefill_$it") }.map { TargetStep("prefill_$it") }
    private val draftStep = drafter?.let { DraftStep(it) }

    private var carry = FloatArray(hidden)
    private var verifyActivations: List<FloatArray> = emptyList()
    private var draftCarry: FloatArray? = null

    init {
        require(kv.isNotEmpty()) { "the target's decode signature has no kv_cache_k_0 input" }
    }

    override fun prefill(tokens: IntArray) {
        var pos = 0
        while (pos < tokens.size) {
            val step = prefillSteps.firstOrNull { it.length <= tokens.size - pos } ?: decodeStep
            step.run(pos, tokens.copyOfRange(pos, pos + step.length))
            pos += step.length
        }
    }

    override fun decode(position: Int, token: Int): FloatArray {
        val out = decodeStep.run(position, intArrayOf(token))
        carry = out.activations[0]
        draftCarry = null
        return out.logits[0]
    }

    override fun draftStep(position: Int, token: Int): FloatArray {
        val step = draftStep ?: error("this bundle has no tf_lite_mtp_drafter model")
        val (logits, projected) = step.run(position, token, draftCarry ?: carry)
        draftCarry = projected
        return logits
    }

    override fun verify(position: Int, tokens: IntArray): Array<FloatArray> {
        val step = verifyStep ?: error("this bundle has no verify signature")
        val out = step.run(position, tokens)
        verifyActivations = out.activations
        return out.logits.toTypedArray()
    }

    override fun accept(count: Int) {
        carry = verifyActivations[count]
        draftCarry = null
    }

    override fun close() {
        (listOfNotNull(decodeStep, verifyStep, draftStep) + prefillSteps).forEach { it.close() }
        kv.values.forEach { it.close() }
        embedder.close()
        perLayerEmbedder?.close()
        drafter?.close()
        target.close()
        env.close()
    }

    /** Logits and activations rows of one target run (empty lists for prefill signatures). */
    private class TargetOutput(val logits: List<FloatArray>, val activations: List<FloatArray>)

    /** A target signature with its own non-KV buffers. */
    private inner class TargetStep(private val signature: String) : AutoCloseable {
        val length: Int = target.dims("input_pos", signature)[0]
        private val inputs = listOf("embeddings", "per_layer_embeddings", "input_pos", "mask", "param_tensor")
            .filter { target.hasInput(it, signature) }.associateWith { target.createInputBuffer(it, signature) }
        private val outputs = listOf("logits", "activations")
            .filter { target.hasOutput(it, signature) }.associateWith { target.createOutputBuffer(it, signature) }
        private val boolMask = target.hasInput("mask", signature) &&
            target.getInputTensorType("mask", signature).elementType == TensorType.ElementType.BOOLEAN

        fun run(position: Int, tokens: IntArray): TargetOutput {
            require(tokens.size == length) { "$signature takes $length tokens, got ${tokens.size}" }
            inputs.getValue("embeddings").writeFloat(embedder.lookup(tokens))
            inputs["per_layer_embeddings"]?.writeFloat(
                (perLayerEmbedder ?: error("the target needs per_layer_embeddings but the bundle has no tf_lite_per_layer_embedder")).lookup(tokens),
            )
            inputs.getValue("input_pos").writeInt(IntArray(length) { position + it })
            inputs["mask"]?.let { writeMask(it, boolMask, rows = length, lastKey = position) }
            inputs["param_tensor"]?.writeInt(paramTensor(position, length))
            target.run(inputs + kv, outputs + kv, signature) // KV buffers are input and output: in place
            return TargetOutput(
                outputs["logits"]?.readFloat()?.let { rows(it, length) }.orEmpty(),
                outputs["activations"]?.readFloat()?.let { rows(it, length) }.orEmpty(),
            )
        }

        override fun close() = (inputs.values + outputs.values).forEach { it.close() }
    }

    /** The drafter step: reads the cache up to N-1 and returns (logits, projected_activations). */
    private inner class DraftStep(private val model: CompiledModel) : AutoCloseable {
        private val kvIn = kv.filterKeys { model.hasInput(it, DRAFT) }
        private val inputs = listOf("activations", "input_pos", "mask", "param_tensor")
            .filter { model.hasInput(it, DRAFT) }.associateWith { model.createInputBuffer(it, DRAFT) }
        private val outputs = listOf("logits", "projected_activations").associateWith { model.createOutputBuffer(it, DRAFT) }
        private val boolMask = model.hasInput("mask", DRAFT) &&
            model.getInputTensorType("mask", DRAFT).elementType == TensorType.ElementType.BOOLEAN

        fun run(position: Int, token: Int, carry: FloatArray): Pair<FloatArray, FloatArray> {
            inputs.getValue("activations").writeFloat(embedder.lookup(intArrayOf(token)) + carry)
            inputs.getValue("input_pos").writeInt(intArrayOf(position - 1))
            inputs["mask"]?.let { writeMask(it, boolMask, rows = 1, lastKey = position - 1) }
            inputs["param_tensor"]?.writeInt(intArrayOf(position - 1, position, position, 0, 0, 0, 0))
            model.run(inputs + kvIn, outputs, DRAFT)
            return outputs.getValue("logits").readFloat() to outputs.getValue("projected_activations").readFloat()
        }

        override fun close() = (inputs.values + outputs.values).forEach { it.close() }
    }

    /** Mask [1,1,rows,C]: row i sees keys `0..lastKey+i`; masked entries are false or -0.7 * FLT_MAX. */
    private fun writeMask(buffer: TensorBuffer, bool: Boolean, rows: Int, lastKey: Int) {
        val c = contextLength
        if (bool) buffer.writeBoolean(BooleanArray(rows * c) { it % c <= lastKey + it / c })
        else buffer.writeFloat(FloatArray(rows * c) { if (it % c <= lastKey + it / c) 0f else MASKED })
    }

    /** An embedding model with one `token_ids` [1,1] input, run once per token. */
    private class Lookup(private val model: CompiledModel) : AutoCloseable {
        private val input = model.createInputBuffers()
        private val output = model.createOutputBuffers()

        fun lookup(tokens: IntArray): FloatArray {
            val parts = tokens.map { token ->
                input[0].writeInt(intArrayOf(token))
                model.run(input, output)
                output[0].readFloat()
            }
            return FloatArray(parts.sumOf { it.size }).also { out ->
                var at = 0
                for (p in parts) { p.copyInto(out, at); at += p.size }
            }
        }

        override fun close() {
            (input + output).forEach { it.close() }
            model.close()
        }
    }

    private companion object {
        const val DECODE = "decode"
        const val VERIFY = "verify"
        const val DRAFT = "mtp_drafter"
        const val MASKED = -0.7f * Float.MAX_VALUE

        /** Prefill lengths probed, largest first; exports write one or more `prefill_<T>`. */
        val PREFILL_LENGTHS = listOf(1024, 512, 256, 128, 64, 32, 16, 8)

        fun Accel.toLiteRt(): Accelerator = when (this) {
            Accel.CPU -> Accelerator.CPU
            Accel.GPU -> Accelerator.GPU
            Accel.NPU -> Accelerator.NPU
        }

        fun CompiledModel.hasInput(name: String, signature: String): Boolean =
            runCatching { getInputTensorType(name, signature) }.isSuccess

        fun CompiledModel.hasOutput(name: String, signature: String): Boolean =
            runCatching { getOutputTensorType(name, signature) }.isSuccess

        fun CompiledModel.dims(input: String, signature: String): List<Int> =
            getInputTensorType(input, signature).layout?.dimensions
                ?: error("input $input of $signature has no static shape: MTP needs a static-shape export")

        /** `{start, start+len, start+len}` padded to the [1,1,1,7] param tensor. */
        fun paramTensor(start: Int, length: Int) = intArrayOf(start, start + length, start + length, 0, 0, 0, 0)

        fun rows(flat: FloatArray, count: Int): List<FloatArray> {
            val width = flat.size / count
            return List(count) { flat.copyOfRange(it * width, (it + 1) * width) }
        }
    }
}
