package dev.edgemtp.demo.engine

import dev.edgemtp.core.ArgmaxModel
import dev.edgemtp.core.BpeTokenizer
import dev.edgemtp.core.DecodeConfig
import dev.edgemtp.core.GreedySpeculator
import dev.edgemtp.core.LitertlmReader
import dev.edgemtp.core.LlmMetadata
import dev.edgemtp.core.SampledSpeculator
import dev.edgemtp.core.SamplerConfig
import dev.edgemtp.core.SectionType
import dev.edgemtp.core.SpeculativeDecoder
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.isActive
import java.io.File

/**
 * Path 2: spec-core's draft/verify loop on LiteRT CompiledModel. Greedy output is token-for-token
 * LiteRT-LM's; with a temperature it uses exact speculative sampling, which LiteRT-LM's MTP lacks.
 * The prompt is fed raw (start token + text, no chat template): this path is a decoding benchmark.
 */
class OwnLoopGenerator(private val settings: EngineSettings, workDir: File) : Generator {
    private val header = LitertlmReader.read(settings.bundle)
    private val metadata: LlmMetadata? = header.sectionsOf(SectionType.LLM_METADATA).firstOrNull()
        ?.let { LlmMetadata.parse(LitertlmReader.readSection(settings.bundle, it)) }
    private val tokenizer = BpeTokenizer.fromBundle(settings.bundle, header)
    private val model = LiteRtMtpModel(BundleFiles.unpack(settings.bundle, header, workDir), settings.accel)

    override suspend fun generate(prompt: String, maxTokens: Int, temperature: Double, onText: (String) -> Unit): RunStats {
        val ids = metadata?.startTokenIds.orEmpty().toIntArray() + tokenizer.encode(prompt)
        val speculator = if (temperature > 0) {
            SampledSpeculator(model, SamplerConfig(temperature, topK = 64, topP = 0.95), draftSampler = SamplerConfig.GREEDY)
        } else {
            GreedySpeculator(ArgmaxModel(model))
        }
        val draftLength = if (settings.mtp) model.draftLength else 0
        val context = currentCoroutineContext()
        val emitted = ArrayList<Int>()
        val result = SpeculativeDecoder(speculator).generate(
            ids,
            DecodeConfig(draftLength, maxTokens, metadata?.stopTokens.orEmpty()),
        ) { token ->
            emitted += token
            onText(tokenizer.decode(emitted.toIntArray()))
            context.isActive
        }
        val s = result.stats
        val mtp = draftLength > 0
        return RunStats(
            tokens = result.tokens.size,
            tokensPerSecond = s.tokensPerSecond,
            timeToFirstTokenMs = s.timeToFirstTokenMs,
            acceptanceRate = s.acceptanceRate.takeIf { mtp },
            draftAcceptanceRate = s.draftAcceptanceRate.takeIf { mtp },
            tokensPerVerify = s.meanAcceptedLength.takeIf { mtp },
            note = "G=$draftLength, ${s.verifies} verifies, ${s.plainDecodes} plain decodes, " +
                "%.1f ms/verify, %.1f ms/draft step, stop: %s".format(s.verifyMsPerStep, s.draftMsPerStep, result.finishReason),
        )
    }

    override fun close() = model.close()
}
