package dev.edgemtp.demo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.result.contract.ActivityResultContracts
import androidx.activity.viewModels
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.darkColorScheme
import androidx.compose.material3.lightColorScheme
import androidx.compose.foundation.isSystemInDarkTheme
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.edgemtp.demo.ui.DemoScreen

/** Hosts [DemoScreen] and the system file picker. */
class MainActivity : ComponentActivity() {
    private val viewModel: DemoViewModel by viewModels()

    private val pickBundle = registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri ->
        uri?.let(viewModel::import)
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        viewModel.inspect()
        setContent {
            MaterialTheme(colorScheme = if (isSystemInDarkTheme()) darkColorScheme() else lightColorScheme()) {
                val state = viewModel.state.collectAsStateWithLifecycle().value
                DemoScreen(
                    state = state,
                    onEdit = viewModel::edit,
                    onPick = { pickBundle.launch(arrayOf("*/*")) },
                    onInspect = { viewModel.inspect() },
                    onRun = viewModel::run,
                    onStop = viewModel::stop,
                )
            }
        }
    }
}
