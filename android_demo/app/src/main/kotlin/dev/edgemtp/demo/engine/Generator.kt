package dev.edgemtp.demo.engine

import java.io.File

/** Where the models run. */
enum class Accel { CPU, GPU, NPU }

/** Which runtime drives the draft/verify loop. */
enum class Runtime(val label: String) {
    /** LiteRT-LM's engine, exactly as AI Edge Gallery runs a bundle. */
    LITERT_LM("LiteRT-LM"),

    /** spec-core's loop on LiteRT CompiledModel, with acceptance statistics. */
    OWN_LOOP("Own loop"),
}

/** What a generator is built for; a change of any field needs a new generator (engine init takes seconds). */
data class EngineSettings(val bundle: File, val runtime: Runtime, val accel: Accel, val mtp: Boolean)

/** Figures shown in the stats panel; null where the runtime does not report them. */
data class RunStats(
    val tokens: Int,
    val tokensPerSecond: Double,
    val timeToFirstTokenMs: Double,
    /** Per-token acceptance estimate a (spec-core's `acceptance_rate`). */
    val acceptanceRate: Double? = null,
    /** accepted / drafted, what LiteRT-LM logs. */
    val draftAcceptanceRate: Double? = null,
    /** Tokens per verify including the bonus (`mean_accepted_length`). */
    val tokensPerVerify: Double? = null,
    val note: String? = null,
)

/** A loaded bundle that turns prompts into streamed text. Not thread-safe: use one thread. */
interface Generator : AutoCloseable {
    /**
     * Generates a reply to [prompt], calling [onText] with the whole text so far after each step.
     * Cancelling the calling coroutine stops generation after the current step.
     */
    suspend fun generate(prompt: String, maxTokens: Int, temperature: Double, onText: (String) -> Unit): RunStats
}

/** Builds the generator for [settings]; [workDir] receives unpacked models and runtime caches. */
fun openGenerator(settings: EngineSettings, workDir: File, nativeLibraryDir: String): Generator =
    when (settings.runtime) {
        Runtime.LITERT_LM -> LiteRtLmGenerator(settings, workDir, nativeLibraryDir)
        Runtime.OWN_LOOP -> OwnLoopGenerator(settings, workDir)
    }
