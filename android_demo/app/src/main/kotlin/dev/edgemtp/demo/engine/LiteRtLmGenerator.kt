package dev.edgemtp.demo.engine

import com.google.ai.edge.litertlm.Backend
import com.google.ai.edge.litertlm.ConversationConfig
import com.google.ai.edge.litertlm.Engine
import com.google.ai.edge.litertlm.EngineConfig
import com.google.ai.edge.litertlm.ExperimentalApi
import com.google.ai.edge.litertlm.ExperimentalFlags
import com.google.ai.edge.litertlm.SamplerConfig
import java.io.File

/**
 * Path 1: the LiteRT-LM engine, set up the way AI Edge Gallery does for a bundle with a
 * `tf_lite_mtp_drafter` section. LiteRT-LM drives the draft/verify loop itself and reports no
 * acceptance figures (it logs "MTP Drafter - Success rate" to logcat when the engine closes).
 */
@OptIn(ExperimentalApi::class)
class LiteRtLmGenerator(
    private val settings: EngineSettings,
    workDir: File,
    nativeLibraryDir: String,
) : Generator {
    private val engine: Engine

    init {
        // Read when the Engine is created: the drafter section is loaded only with this flag on.
        ExperimentalFlags.enableSpeculativeDecoding = settings.mtp
        ExperimentalFlags.enableBenchmark = true
        val backend = when (settings.accel) {
            Accel.CPU -> Backend.CPU()
            Accel.GPU -> Backend.GPU()
            Accel.NPU -> Backend.NPU(nativeLibraryDir = nativeLibraryDir)
        }
        val cache = File(workDir, "litertlm-cache").apply { mkdirs() }
        engine = Engine(EngineConfig(modelPath = settings.bundle.path, backend = backend, cacheDir = cache.path))
        engine.initialize()
    }

    override suspend fun generate(prompt: String, maxTokens: Int, temperature: Double, onText: (String) -> Unit): RunStats {
        // LiteRT-LM's MTP is greedy-only: its sampler only picks the first token of each round.
        val sampler = if (temperature > 0) SamplerConfig(topK = 64, topP = 0.95, temperature = temperature)
        else SamplerConfig(topK = 1, topP = 1.0, temperature = 0.0)
        val config = ConversationConfig(
            samplerConfig = sampler,
            maxOutputToken = maxTokens,
            enableSpeculativeDecoding = settings.mtp,
        )
        engine.createConversation(config).use { conversation ->
            val start = System.nanoTime()
            var firstChunk = 0L
            var chunks = 0
            val text = StringBuilder()
            conversation.sendMessageAsync(prompt).collect { message ->
                if (firstChunk == 0L) firstChunk = System.nanoTime()
                chunks++
                text.append(message.toString())
                onText(text.toString())
            }
            val end = System.nanoTime()
            val info = runCatching { conversation.getBenchmarkInfo() }.getOrNull()
            return RunStats(
                tokens = info?.lastDecodeTokenCount ?: chunks,
                tokensPerSecond = info?.lastDecodeTokensPerSecond
                    ?: if (end > firstChunk && chunks > 1) (chunks - 1) / ((end - firstChunk) / 1e9) else 0.0,
                timeToFirstTokenMs = info?.timeToFirstTokenInSecond?.times(1000) ?: ((firstChunk - start) / 1e6),
                note = "LiteRT-LM reports no acceptance statistics; see logcat for 'MTP Drafter - Success rate' after closing.",
            )
        }
    }

    override fun close() = engine.close()
}
