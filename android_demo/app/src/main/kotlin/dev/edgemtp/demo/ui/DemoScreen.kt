package dev.edgemtp.demo.ui

import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.safeDrawingPadding
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.text.KeyboardOptions
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.FilterChip
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Slider
import androidx.compose.material3.Surface
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.text.input.KeyboardType
import androidx.compose.ui.unit.dp
import dev.edgemtp.demo.UiState
import dev.edgemtp.demo.engine.Accel
import dev.edgemtp.demo.engine.RunStats
import dev.edgemtp.demo.engine.Runtime

/** The single screen: bundle, runtime and accelerator choice, MTP toggle, prompt, output, stats. */
@Composable
fun DemoScreen(
    state: UiState,
    onEdit: ((UiState) -> UiState) -> Unit,
    onPick: () -> Unit,
    onInspect: () -> Unit,
    onRun: () -> Unit,
    onStop: () -> Unit,
) {
    Surface(Modifier.fillMaxSize()) {
        Column(
            Modifier.safeDrawingPadding().padding(12.dp).verticalScroll(rememberScrollState()),
            verticalArrangement = Arrangement.spacedBy(8.dp),
        ) {
            Text("edge-mtp demo", style = MaterialTheme.typography.titleLarge)

            OutlinedTextField(
                value = state.bundlePath,
                onValueChange = { v -> onEdit { it.copy(bundlePath = v) } },
                label = { Text("Bundle (.litertlm)") },
                singleLine = true,
                modifier = Modifier.fillMaxWidth(),
            )
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                OutlinedButton(onClick = onPick, enabled = !state.busy) { Text("Pick file…") }
                OutlinedButton(onClick = onInspect) { Text("Inspect") }
            }
            if (state.bundleInfo.isNotEmpty()) {
                Text(state.bundleInfo, style = MaterialTheme.typography.bodySmall, fontFamily = FontFamily.Monospace)
            }

            Choice("Runtime", Runtime.entries, state.runtime, { it.label }) { v -> onEdit { it.copy(runtime = v) } }
            Choice("Accelerator", Accel.entries, state.accel, { it.name }) { v -> onEdit { it.copy(accel = v) } }
            Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                Text("MTP (speculative decoding)")
                Switch(checked = state.mtp, onCheckedChange = { v -> onEdit { it.copy(mtp = v) } })
            }
            Text("Temperature %.2f%s".format(state.temperature, if (state.temperature == 0f) " (greedy)" else ""))
            Slider(value = state.temperature, onValueChange = { v -> onEdit { it.copy(temperature = v) } }, valueRange = 0f..1.5f)
            OutlinedTextField(
                value = state.maxTokens.toString(),
                onValueChange = { v -> v.toIntOrNull()?.let { n -> onEdit { it.copy(maxTokens = n.coerceIn(1, 8192)) } } },
                label = { Text("Max tokens") },
                keyboardOptions = KeyboardOptions(keyboardType = KeyboardType.Number),
                singleLine = true,
            )

            OutlinedTextField(
                value = state.prompt,
                onValueChange = { v -> onEdit { it.copy(prompt = v) } },
                label = { Text("Prompt") },
                minLines = 3,
                modifier = Modifier.fillMaxWidth(),
            )
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp), verticalAlignment = Alignment.CenterVertically) {
                Button(onClick = onRun, enabled = !state.busy) { Text("Generate") }
                OutlinedButton(onClick = onStop, enabled = state.busy) { Text("Stop") }
                Text(state.status, style = MaterialTheme.typography.bodySmall)
            }

            Card(Modifier.fillMaxWidth()) {
                Text(state.output.ifEmpty { "…" }, Modifier.padding(12.dp))
            }
            state.stats?.let { StatsPanel(it) }
        }
    }
}

/** A row of chips choosing one of [options]. */
@Composable
private fun <T> Choice(title: String, options: List<T>, selected: T, label: (T) -> String, onSelect: (T) -> Unit) {
    Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
        Text(title)
        options.forEach { option ->
            FilterChip(selected = option == selected, onClick = { onSelect(option) }, label = { Text(label(option)) })
        }
    }
}

/** Decode speed, time to first token and, where the runtime reports them, the acceptance figures. */
@Composable
private fun StatsPanel(stats: RunStats) {
    fun fmt(v: Double?, pattern: String) = v?.let { pattern.format(it) } ?: "n/a"
    Card(Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(2.dp)) {
            Text("Stats", style = MaterialTheme.typography.titleMedium)
            Text("Tokens: ${stats.tokens}")
            Text("Decode speed: ${fmt(stats.tokensPerSecond, "%.1f tok/s")}")
            Text("Time to first token: ${fmt(stats.timeToFirstTokenMs, "%.0f ms")}")
            Text("Acceptance rate (per token): ${fmt(stats.acceptanceRate?.times(100), "%.0f %%")}")
            Text("Draft acceptance (accepted/drafted): ${fmt(stats.draftAcceptanceRate?.times(100), "%.0f %%")}")
            Text("Tokens per verify: ${fmt(stats.tokensPerVerify, "%.2f")}")
            stats.note?.let { Text(it, style = MaterialTheme.typography.bodySmall) }
        }
    }
}
