package dev.edgemtp.demo

import android.app.Application
import android.net.Uri
import android.provider.OpenableColumns
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.edgemtp.core.LitertlmReader
import dev.edgemtp.demo.engine.Accel
import dev.edgemtp.demo.engine.EngineSettings
import dev.edgemtp.demo.engine.Generator
import dev.edgemtp.demo.engine.RunStats
import dev.edgemtp.demo.engine.Runtime
import dev.edgemtp.demo.engine.openGenerator
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.io.File
import java.util.concurrent.Executors

/** Everything the screen shows. */
data class UiState(
    val bundlePath: String = "/data/local/tmp/model.litertlm",
    val bundleInfo: String = "",
    val runtime: Runtime = Runtime.LITERT_LM,
    val accel: Accel = Accel.GPU,
    val mtp: Boolean = true,
    val temperature: Float = 0f,
    val maxTokens: Int = 256,
    val prompt: String = "Explain speculative decoding in three sentences.",
    val output: String = "",
    val stats: RunStats? = null,
    val status: String = "",
    val busy: Boolean = false,
)

/** Loads bundles, owns the generator and runs prompts on one dedicated engine thread. */
class DemoViewModel(app: Application) : AndroidViewModel(app) {
    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state

    /** Native runtimes are created and driven on this single thread. */
    private val engineThread = Executors.newSingleThreadExecutor().asCoroutineDispatcher()
    private var generator: Generator? = null
    private var generatorSettings: EngineSettings? = null
    private var job: Job? = null

    /** Applies a UI edit (settings, prompt). */
    fun edit(change: (UiState) -> UiState) = _state.update(change)

    /** Reads the bundle header with spec-core and shows its sections. */
    fun inspect() = viewModelScope.launch {
        val file = File(_state.value.bundlePath)
        val info = withContext(Dispatchers.IO) {
            runCatching {
                val h = LitertlmReader.read(file)
                buildString {
                    append("LiteRT-LM ${h.version}, ${h.sections.size} sections, ")
                    append(if (h.supportsSpeculativeDecoding) "MTP drafter present\n" else "no MTP drafter\n")
                    h.sections.forEach { append(it.toString()).append('\n') }
                }
            }.getOrElse { it.message ?: it.toString() }
        }
        _state.update { it.copy(bundleInfo = info.trim()) }
    }

    /** Copies a document picked with the system file picker into app storage and selects it. */
    fun import(uri: Uri) = viewModelScope.launch {
        _state.update { it.copy(busy = true, status = "Copying bundle…") }
        val result = withContext(Dispatchers.IO) {
            runCatching {
                val resolver = getApplication<Application>().contentResolver
                val name = resolver.query(uri, arrayOf(OpenableColumns.DISPLAY_NAME), null, null, null)?.use { c ->
                    if (c.moveToFirst()) c.getString(0) else null
                } ?: "picked.litertlm"
                val dir = File(getApplication<Application>().filesDir, "bundles").apply { mkdirs() }
                val out = File(dir, name)
                val tmp = File(dir, "$name.part")
                resolver.openInputStream(uri)!!.use { input -> tmp.outputStream().use { input.copyTo(it, 1 shl 20) } }
                check(tmp.renameTo(out)) { "cannot write $out" }
                out
            }
        }
        result.onSuccess { file -> _state.update { it.copy(bundlePath = file.path, busy = false, status = "Imported ${file.name}") }; inspect() }
            .onFailure { e -> _state.update { it.copy(busy = false, status = "Import failed: ${e.message}") } }
    }

    /** Generates a reply to the prompt with the current settings, streaming into [UiState.output]. */
    fun run() {
        if (job?.isActive == true) return
        val s = _state.value
        val settings = EngineSettings(File(s.bundlePath), s.runtime, s.accel, s.mtp)
        job = viewModelScope.launch {
            _state.update { it.copy(busy = true, output = "", stats = null, status = "Loading…") }
            try {
                val stats = withContext(engineThread) {
                    val g = generatorFor(settings)
                    _state.update { it.copy(status = "Generating…") }
                    g.generate(s.prompt, s.maxTokens, s.temperature.toDouble()) { text -> _state.update { it.copy(output = text) } }
                }
                _state.update { it.copy(stats = stats, status = "Done") }
            } catch (e: kotlinx.coroutines.CancellationException) {
                _state.update { it.copy(status = "Stopped") }
                throw e
            } catch (e: Throwable) {
                _state.update { it.copy(status = "Error: ${e.message ?: e}") }
            } finally {
                _state.update { it.copy(busy = false) }
            }
        }
    }

    /** Stops the running generation after its current step. */
    fun stop() {
        job?.cancel()
    }

    /** Reuses the loaded generator when nothing that shapes it changed. */
    private fun generatorFor(settings: EngineSettings): Generator {
        generator?.takeIf { generatorSettings == settings }?.let { return it }
        generator?.close()
        generator = null
        val app = getApplication<Application>()
        return openGenerator(settings, app.cacheDir, app.applicationInfo.nativeLibraryDir).also {
            generator = it
            generatorSettings = settings
        }
    }

    override fun onCleared() {
        val g = generator
        generator = null
        engineThread.executor.execute { g?.close() }
        engineThread.close()
    }
}
